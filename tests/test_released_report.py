"""The released stage-3 model (`models.released_report`) against the released computation written out here:
the encoder's tokens (the reference forward of tests/test_released.py), llama_proj, layer_norm, the prompt
halves around them after BOS, a tiny random Llama and a tiny word-level tokenizer saved to a folder."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_released import ref_forward_features, released_state, save_stage  # noqa: E402

from cxpmrg_lib.models.released_report import PROMPT, RELEASED_DECODING, load_released_report_model  # noqa: E402

WORDS = ("Human: <Img> </Img> Generate a comprehensive and detailed diagnosis report for this chest xray image. "
         "\nAssistant: the heart is normal size lungs are clear no effusion pneumothorax . stable").split()


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llm")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    enc2 = released_state(dim=32, depth=2, grid=4, patch=8, seed=11)
    enc3 = released_state(dim=32, depth=2, grid=4, patch=8, seed=12)     # stage 3 trains the encoder further
    s2 = save_stage(folder / "clip.pth", 2, enc2)
    g = torch.Generator().manual_seed(3)
    model3 = {"visual_encoder." + k: v for k, v in enc3.items()}
    model3.update({"llama_proj.weight": 0.2 * torch.randn(24, 32, generator=g), "llama_proj.bias": torch.zeros(24),
                   "layer_norm.weight": 1 + 0.1 * torch.randn(24, generator=g),
                   "layer_norm.bias": 0.1 * torch.randn(24, generator=g)})
    s3 = folder / "finetune.pth"
    torch.save({"model": model3, "config": {"beam_size": 3}, "epoch": 1, "step": 5}, s3)
    return s2, s3, enc3, model3


def released_inputs(images_per_view, enc_sd, head, tokenizer, lm):
    """The released encode_img + layer_norm + prompt_wrap + BOS, written out."""
    feats = torch.stack([ref_forward_features(v, enc_sd) for v in images_per_view]).mean(0).float()
    img = F.layer_norm(F.linear(feats, head["llama_proj.weight"], head["llama_proj.bias"]), (24,),
                       head["layer_norm.weight"], head["layer_norm.bias"], 1e-5)
    before, after = PROMPT.split("<ImageHere>")
    emb = lm.get_input_embeddings()
    ids_b = tokenizer(before, return_tensors="pt", add_special_tokens=False).input_ids
    ids_a = tokenizer(after, return_tensors="pt", add_special_tokens=False).input_ids
    b = img.shape[0]
    bos = emb(torch.ones(b, 1, dtype=torch.long) * tokenizer.bos_token_id)
    return torch.cat([bos, emb(ids_b).expand(b, -1, -1), img, emb(ids_a).expand(b, -1, -1)], dim=1)


def released_decode(tokenizer, ids):
    ids = ids.tolist()
    if ids[0] == 0:
        ids = ids[1:]
    if ids[0] == 1:
        ids = ids[1:]
    return tokenizer.decode(ids).split("</s>")[0].strip().replace("<unk>", "")


def test_released_report_model_matches_the_released_computation(files, llm_dir):
    s2, s3, enc3, model3 = files
    model = load_released_report_model(s3, llm_dir, stage2=s2)
    assert model.decoding == dict(num_beams=3, min_new_tokens=80, max_new_tokens=120, repetition_penalty=2.0,
                                  length_penalty=2.0) == RELEASED_DECODING
    assert model.tokenizer.convert_ids_to_tokens(model.prompt_ids[0].tolist()) == ["Human:", "<Img>"]
    gen = torch.Generator().manual_seed(5)
    views = torch.randn(2, 2, 3, 32, 32, generator=gen)                   # 2 studies x 2 views
    head = {k: v for k, v in model3.items() if not k.startswith("visual_encoder.")}
    with torch.no_grad():
        ref_in = released_inputs([views[:, 0], views[:, 1]], enc3, head, model.tokenizer, model.lm)
        ours_in = model.prompt_embeds(views, torch.ones(2, 2, dtype=torch.bool))
        assert float((ours_in - ref_in).abs().max()) < 1e-4
        ref_logits = model.lm(inputs_embeds=ref_in).logits[:, -1]
        torch.testing.assert_close(model.first_step_logits(views), ref_logits, rtol=1e-4, atol=1e-4)
        # greedy with the released repetition penalty, one step at a time without a cache
        ids = torch.empty(2, 0, dtype=torch.long)
        for _ in range(10):
            logits = model.lm(inputs_embeds=torch.cat([ref_in, model.lm.get_input_embeddings()(ids)], 1)).logits[:, -1]
            if ids.shape[1]:
                seen = torch.gather(logits, 1, ids)
                logits = logits.scatter(1, ids, torch.where(seen < 0, seen * 2.0, seen / 2.0))
            logits[:, model.tokenizer.eos_token_id] = float("-inf")           # min_new_tokens = 10
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    ours = model.generate(views, num_beams=1, min_new_tokens=10, max_new_tokens=10, length_penalty=1.0)
    assert ours == [released_decode(model.tokenizer, row) for row in ids]
    assert all(r.split() for r in ours)
    beam = model.generate(views[:1], min_new_tokens=4, max_new_tokens=6)    # the released beam-3 setting runs
    assert isinstance(beam[0], str)


def test_stage3_file_is_strict(files, llm_dir, tmp_path):
    from cxpmrg_lib.models.released import ReleasedCheckpointError

    s2, s3, enc3, model3 = files
    bad = dict(model3)
    del bad["layer_norm.bias"]
    bad["lm_head.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(ReleasedCheckpointError, match=r"bad\.pth: missing 'layer_norm\.bias'; unexpected 'lm_head"):
        load_released_report_model(path, llm_dir, stage2=s2)
    # without the stage-2 file the stage-3 file's own encoder serves (it holds all of it)
    alone = load_released_report_model(s3, llm_dir)
    ref = load_released_report_model(s3, llm_dir, stage2=s2)
    for (k, a), b in zip(alone.encoder.state_dict().items(), ref.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_report_generator_from_released_files(files, llm_dir, tmp_path):
    """`ReportGenerator.from_released`: image files read as the released data helper reads them (RGB, Swin norm)."""
    from PIL import Image

    from cxpmrg_lib.models.released_report import released_pixels
    from cxpmrg_lib.stages.generate import ReportGenerator

    s2, s3, _, _ = files
    rng = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        arr = (torch.rand(40, 50, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(tmp_path / f"view{i}.png")
        paths.append(tmp_path / f"view{i}.png")
    gen = ReportGenerator.from_released(s3, llm_dir, stage2=s2)
    pixels = released_pixels(paths[0], 32)
    assert pixels.shape == (3, 32, 32)
    rgb = pixels * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    torch.testing.assert_close(rgb[0], rgb[1]) and torch.testing.assert_close(rgb[0], rgb[2])   # grey as RGB
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1 + 1e-6
    images, mask = gen.images_tensor(paths)
    assert images.shape == (1, 2, 3, 32, 32) and mask.all()
    report = gen.generate(paths, num_beams=1, min_new_tokens=3, max_new_tokens=5)
    assert report == gen.model.generate(images, mask, num_beams=1, min_new_tokens=3, max_new_tokens=5)[0]


def test_our_report_model_exported_to_the_released_formats_gives_the_same_reports(files, llm_dir, tmp_path):
    """Part 4's round trip: one of our stage-3 models with the released encoder -> stage2.pth, stage3.pth, llm/
    -> the released model: the same prompt embeddings, logits and reports."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cxpmrg_lib.models.released import load_encoder
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import VisualPrefixLM
    from cxpmrg_lib.stages.export import export_released

    s2, _, _, _ = files
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    head = VisualPrefixLM(lm, tok, 32)
    with torch.no_grad():
        for p in (*head.proj.parameters(), *head.proj_norm.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    ours = ReportModel(load_encoder(s2), head).eval()
    out = export_released(ours, tmp_path / "released")
    theirs = load_released_report_model(out / "stage3.pth", out / "llm", stage2=out / "stage2.pth")
    views = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        from cxpmrg_lib.models.vision_mamba import study_tokens
        ours_embeds = head._prefix_embeds(study_tokens(ours.encoder, views))
        torch.testing.assert_close(theirs.prompt_embeds(views), ours_embeds, rtol=0, atol=0)
    decoding = dict(num_beams=3, min_new_tokens=6, max_new_tokens=9, repetition_penalty=2.0, length_penalty=2.0)
    reports = theirs.generate(views, **decoding)
    assert ours.generate(views, **decoding, no_repeat_ngram_size=0) == reports
    assert all(len(r.split()) >= 3 for r in reports), reports
    with pytest.raises(ValueError, match="arch='released'"):
        from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
        export_released(ReportModel(VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=32, depth=1)), head),
                        tmp_path / "no")


def test_export_released_names_a_folder_that_is_no_export(tmp_path):
    from cxpmrg_lib.stages.export import export_released

    with pytest.raises(FileNotFoundError, match="export"):
        export_released(tmp_path, tmp_path / "out")
