"""CvT2DistilGPT2-style: a conv-token ViT read by a warm-started GPT-2 through cross-attention."""
import torch

from cxpmrg_lib.models.report_lm import ReportLMConfig, build_report_lm, train_bpe_tokenizer
from cxpmrg_lib.models.zoo.cvt2gpt2 import CvT2GPT2

REPORTS = ["the lungs are clear . no effusion .", "small left pleural effusion . heart size is normal .",
           "the heart is enlarged . no pneumothorax .", "right lower lobe opacity . no effusion ."] * 4


def _gpt2_dir(tmp_path):
    tok = train_bpe_tokenizer(REPORTS, tmp_path / "tok", vocab_size=300, min_frequency=1)
    lm = build_report_lm(ReportLMConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                        max_position=64, arch="gpt2"), tok)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm", lm


def test_warm_start_keeps_the_lm_and_adds_cross_attention_that_learns(tmp_path):
    torch.manual_seed(0)
    lm_dir, lm = _gpt2_dir(tmp_path)
    model = CvT2GPT2(lm_dir, REPORTS)
    # the decoder's own weights are the LM's; cross-attention is new
    assert torch.equal(model.decoder.transformer.wte.weight, lm.transformer.wte.weight)
    assert any("crossattention" in n for n, _ in model.decoder.named_parameters())
    assert model.typical_tokens > 0 and model.max_report_tokens <= 62

    images = torch.rand(4, 2, 1, 64, 64)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    reports = REPORTS[:4]
    out = model(images, mask, reports)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["encoder.embed.stem.0.weight"].abs().sum() > 0             # the image reaches the loss
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "crossattention" in n)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out["loss"].item()
    for _ in range(15):
        opt.zero_grad()
        loss = model(images, mask, reports)["loss"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first

    texts = model.generate(images, mask, num_beams=2, max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.5,
                           no_repeat_ngram_size=3)
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    model.train()
    model.generate(images[:1], mask[:1], num_beams=1, max_new_tokens=3)
    assert model.training



def test_the_warm_start_load_is_quiet(tmp_path):
    """The new cross-attention is by design: no transformers warning block (newly initialized weights,
    layers 'not sharded', an unrecognised loss type) is logged by a load and a loss."""
    import logging

    from transformers.utils import logging as hf_logging

    lm_dir, _ = _gpt2_dir(tmp_path)
    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    library = hf_logging._get_library_root_logger()     # transformers' loggers do not propagate to the root
    library.addHandler(handler)
    try:
        model = CvT2GPT2(lm_dir, REPORTS)
        model(torch.rand(2, 1, 1, 64, 64), torch.ones(2, 1, dtype=torch.bool), REPORTS[:2])["loss"].item()
    finally:
        library.removeHandler(handler)
    for noise in ("not sharded", "newly initialized", "TRAIN this model", "loss_type"):
        assert not [r for r in records if noise in r], records
