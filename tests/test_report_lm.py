"""Stage-3 report LM: BPE tokenizer, plain LM batches, the visual-prefix head around a frozen LM."""
from __future__ import annotations

import difflib
import json

import pytest
import torch
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer, LlamaForCausalLM

from cxpmrg_lib.models.report_lm import (IMAGE_TOKENS, PAPER_PROMPT, ReportLMConfig, VisualPrefixLM,
                                         build_report_lm, lm_batch, load_report_lm, median_report_tokens,
                                         train_bpe_tokenizer)

REPORTS = [
    "The heart is normal in size. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly with small left pleural effusion.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Endotracheal tube terminates 4 cm above the carina. Lungs are clear.",
]
EXTRA = ["Lungs are clear bilaterally.", "Stable cardiomediastinal silhouette.", "No acute cardiopulmonary process."]
TINY = ReportLMConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=256)
SHORT_PROMPT = "<Img><ImageHere></Img>"
VISUAL_DIM, VISUAL_T = 16, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny LM's ops are too small for intra-op threads; on a shared 2-core box they only thrash (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(REPORTS * 3 + EXTRA, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300,
                               min_frequency=1)


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny LM that learned the 4 reports, frozen; a projection trained to pick report i for visual i."""
    torch.manual_seed(0)
    lm = build_report_lm(TINY, tok)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    batch = lm_batch(tok, REPORTS, 64)
    for _ in range(100):
        loss = lm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    model = VisualPrefixLM(lm, tok, VISUAL_DIM, prompt=SHORT_PROMPT,
                           typical_report_tokens=median_report_tokens(tok, REPORTS))
    visual = torch.randn(4, VISUAL_T, VISUAL_DIM, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(150):
        loss = model(visual, REPORTS)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, visual, first, loss.item()


def _nearest(text: str) -> int:
    return max(range(len(REPORTS)), key=lambda i: difflib.SequenceMatcher(None, text, REPORTS[i]).ratio())


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_special_tokens_and_reload(tok, tmp_path_factory):
    text = "Heart size 12.5 cm;  new   opacity\nat the RIGHT base (unchanged) — no effusion, 3/4 clips."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text                      # byte level: exact, unseen words and unicode included
    assert " ".join(tok.decode(ids).split()) == " ".join(text.split())
    assert "Ġ" not in tok.decode(ids) and "Ċ" not in tok.decode(ids)
    assert tok.unk_token_id not in ids
    for t in IMAGE_TOKENS:
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    wrapped = tok("a<Img>b<ImageHere></Img>", add_special_tokens=False)["input_ids"]
    assert wrapped[1] == tok.convert_tokens_to_ids("<Img>") and len(wrapped) == 5
    assert tok.decode(wrapped, skip_special_tokens=True) == "ab"
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert len(set(specials)) == 4 and tok.convert_ids_to_tokens(specials) == ["<s>", "</s>", "<pad>", "<unk>"]
    # merges were learnt: a frequent word is one token, not bytes
    assert len(tok("effusion", add_special_tokens=False)["input_ids"]) <= 2
    out = tok.name_or_path
    again = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and len(again) == len(tok)


def test_tokenizer_deterministic_and_errors(tmp_path):
    a = train_bpe_tokenizer(REPORTS + EXTRA, tmp_path / "a", vocab_size=280, min_frequency=1)
    b = train_bpe_tokenizer(iter(REPORTS + EXTRA), tmp_path / "b", vocab_size=280, min_frequency=1)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="no non-empty text"):
        train_bpe_tokenizer(["", "  "], tmp_path / "c")
    with pytest.raises(FileExistsError):
        train_bpe_tokenizer(REPORTS, tmp_path / "a", vocab_size=280)
    assert not (tmp_path / "c").exists()


def test_lm_batch_exact(tok):
    b = lm_batch(tok, [REPORTS[0], "Clear."], max_tokens=8)
    long_ids = tok(REPORTS[0], add_special_tokens=False)["input_ids"]
    short_ids = tok("Clear.", add_special_tokens=False)["input_ids"]
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert b["input_ids"][0].tolist() == [bos] + long_ids[:6] + [eos]
    row1 = [bos] + short_ids + [eos]
    assert b["input_ids"][1].tolist() == row1 + [pad] * (8 - len(row1))
    assert b["attention_mask"][1].tolist() == [1] * len(row1) + [0] * (8 - len(row1))
    assert b["labels"][1].tolist() == [-100] + short_ids + [eos] + [-100] * (8 - len(row1))
    assert b["labels"][0, 0] == -100 and b["labels"][0, -1] == eos
    with pytest.raises(ValueError, match="no room"):
        lm_batch(tok, REPORTS, max_tokens=2)


def test_build_report_lm_sizes_and_seed(tok):
    lm = build_report_lm(ReportLMConfig(), tok)
    c = lm.config
    assert isinstance(lm, LlamaForCausalLM)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (192, 4, 6, 6)
    assert (c.intermediate_size, c.max_position_embeddings, c.rope_theta) == (512, 256, 10000.0)
    assert c.vocab_size == len(tok) and c.eos_token_id == tok.eos_token_id and c.pad_token_id == tok.pad_token_id
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    state = torch.random.get_rng_state()
    again = build_report_lm(ReportLMConfig(), tok)
    assert torch.equal(torch.random.get_rng_state(), state)     # the global RNG is untouched
    assert torch.equal(lm.model.embed_tokens.weight, again.model.embed_tokens.weight)
    other = build_report_lm(ReportLMConfig(seed=1), tok)
    assert not torch.equal(lm.model.embed_tokens.weight, other.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="divisible"):
        ReportLMConfig(hidden_size=100, num_heads=6)


def test_load_report_lm_local_pretrained_and_lora_error(tok, tmp_path):
    lm = build_report_lm(TINY, tok)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    loaded, loaded_tok = load_report_lm(ReportLMConfig(pretrained=str(tmp_path / "lm")))
    assert torch.equal(loaded.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert loaded_tok(REPORTS[0])["input_ids"] == tok(REPORTS[0])["input_ids"]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_report_lm(ReportLMConfig(pretrained=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_report_lm(TINY)
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"cxpmrg_lib\[lora\]"):
            load_report_lm(ReportLMConfig(hidden_size=64, num_layers=1, num_heads=4, lora_rank=4), tok)



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_lm_names_its_loss_so_transformers_does_not_warn(arch, tok, tmp_path, caplog):
    lm = build_report_lm(ReportLMConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    loaded, _ = load_report_lm(ReportLMConfig(pretrained=str(tmp_path / "lm")))
    ids = torch.tensor([tok(REPORTS[0])["input_ids"]])
    with caplog.at_level("WARNING"):
        for model in (lm, loaded):
            assert model.loss_type == "ForCausalLM"
            assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert "loss_type" not in caplog.text


# ----------------------------------------------------------------------------- the visual-prefix head

def test_label_mask_exact_positions_paper_prompt(tok):
    lm = build_report_lm(TINY, tok)
    model = VisualPrefixLM(lm, tok, VISUAL_DIM)
    assert model.prompt == PAPER_PROMPT
    reports = [REPORTS[1], "Clear."]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in reports]
    assert len(ids[0]) > len(ids[1]) + 2
    visual = torch.randn(2, VISUAL_T, VISUAL_DIM)
    batch = model.build_inputs(visual, reports)
    p = model.prefix_length + VISUAL_T
    before = tok("Human: <Img>", add_special_tokens=False)["input_ids"]
    assert model.prompt_before_ids.tolist() == [tok.bos_token_id] + before
    width = p + len(ids[0]) + 1
    assert batch["inputs_embeds"].shape == (2, width, TINY.hidden_size)
    eos = tok.eos_token_id
    for row, r_ids in enumerate(ids):
        n = len(r_ids) + 1
        assert batch["labels"][row].tolist() == [-100] * p + r_ids + [eos] + [-100] * (width - p - n)
        assert batch["attention_mask"][row].tolist() == [1] * (p + n) + [0] * (width - p - n)
    embed = lm.get_input_embeddings()
    # the visual slot holds the projected tokens, the rest are the prompt's token embeddings
    pb = len(model.prompt_before_ids)
    assert torch.allclose(batch["inputs_embeds"][:, pb:pb + VISUAL_T], model.proj_norm(model.proj(visual)))
    assert torch.equal(batch["inputs_embeds"][0, pb + VISUAL_T:p], embed(model.prompt_after_ids))
    # truncation keeps max_report_tokens report tokens, then eos
    short = VisualPrefixLM(lm, tok, VISUAL_DIM, max_report_tokens=3).build_inputs(visual, reports)
    assert short["labels"][0, p:].tolist() == ids[0][:3] + [eos]
    loss = model(visual, reports)["loss"]
    assert torch.isfinite(loss) and loss.item() > 1.0      # an untrained LM does not know the report
    with pytest.raises(ValueError, match="2 visual inputs but 1 reports"):
        model(visual, reports[:1])
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        model(torch.randn(2, VISUAL_T, 8), reports)
    with pytest.raises(ValueError, match="exactly once"):
        VisualPrefixLM(lm, tok, VISUAL_DIM, prompt="Human: report please")


def test_frozen_lm_no_grad_unchanged_and_train_mode(tok, tmp_path):
    lm = build_report_lm(TINY, tok)
    model = VisualPrefixLM(lm, tok, VISUAL_DIM)
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    proj_before = model.proj.weight.detach().clone()
    model.train()
    assert model.training and model.proj.training and not lm.training and not lm.model.layers[0].training
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)       # all parameters offered: the frozen ones must not move
    loss = model(torch.randn(2, VISUAL_T, VISUAL_DIM), REPORTS[:2])["loss"]
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in lm.parameters())
    assert all(torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())
    assert (model.proj.weight - proj_before).abs().max() > 1e-3
    assert model.proj_norm.weight.grad is not None
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "proj.bias", "proj.weight", "proj_norm.bias", "proj_norm.weight"]
    # checkpoints of a model holding the head store only what is trained, and load back strictly
    holder = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, VISUAL_DIM), "head": model})
    keys = set(holder.state_dict())
    assert keys == {"encoder.weight", "encoder.bias", "head.proj.weight", "head.proj.bias",
                    "head.proj_norm.weight", "head.proj_norm.bias"}
    save_model(holder, str(tmp_path / "ck.safetensors"))
    fresh = VisualPrefixLM(build_report_lm(TINY, tok), tok, VISUAL_DIM)
    holder2 = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, VISUAL_DIM), "head": fresh})
    load_model(holder2, str(tmp_path / "ck.safetensors"), strict=True)
    assert torch.equal(fresh.proj.weight, model.proj.weight)
    with pytest.raises(RuntimeError, match="proj_norm"):
        holder2.load_state_dict({k: v for k, v in holder.state_dict().items() if "proj_norm" not in k})
    model.eval()
    model.train()
    assert not lm.training


def test_decoding_budget(tok):
    lm = build_report_lm(TINY, tok)
    assert (VisualPrefixLM(lm, tok, 4).min_new_tokens, VisualPrefixLM(lm, tok, 4).max_new_tokens) == (80, 120)
    m = VisualPrefixLM(lm, tok, 4, typical_report_tokens=20)
    assert (m.min_new_tokens, m.max_new_tokens) == (10, 30)
    m = VisualPrefixLM(lm, tok, 4, typical_report_tokens=200, max_report_tokens=128)
    assert (m.min_new_tokens, m.max_new_tokens) == (100, 129)
    m = VisualPrefixLM(lm, tok, 4, max_report_tokens=60)
    assert (m.min_new_tokens, m.max_new_tokens) == (61, 61)
    assert median_report_tokens(tok, ["a b c", "a", "a b c d e"]) == len(tok("a b c", add_special_tokens=False)
                                                                         ["input_ids"])


def test_overfit_generation_batching_and_save_load(trained, tok, tmp_path):
    model, visual, first_loss, last_loss = trained
    assert last_loss < 0.3 * first_loss and last_loss < 0.5
    beam = model.generate(visual)                                    # paper decoding: beam 3, penalty 2.0
    greedy = model.generate(visual, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert [_nearest(t) for t in beam] == [0, 1, 2, 3]
    assert [_nearest(t) for t in greedy] == [0, 1, 2, 3]
    assert sum(t == r for t, r in zip(beam, REPORTS)) >= 3
    assert all(isinstance(t, str) and "<" not in t and "Ġ" not in t for t in beam + greedy)
    # batch generation equals one by one, and chunked generation equals both
    assert [model.generate(visual[i:i + 1])[0] for i in range(4)] == beam
    assert model.generate(visual, batch_size=3) == beam
    assert [model.generate(visual[i:i + 1], num_beams=1, repetition_penalty=1.0,
                           no_repeat_ngram_size=0)[0] for i in range(4)] == greedy
    assert model.training                                            # generate restores the mode it found
    # save/load: only the projection is written, generations are identical
    out = model.save_pretrained(tmp_path / "head")
    cfg = json.loads((out / "visual_prefix.json").read_text())
    assert cfg["prompt"] == SHORT_PROMPT and cfg["visual_dim"] == VISUAL_DIM and cfg["lm"]["hidden_size"] == 64
    assert sum(f.stat().st_size for f in out.iterdir()) < 20_000     # no LM weights
    again = VisualPrefixLM.from_pretrained(out, model.lm, tok)
    assert again.generate(visual) == beam
    with pytest.raises(ValueError, match="hidden 64"):
        VisualPrefixLM.from_pretrained(out, build_report_lm(ReportLMConfig(hidden_size=32, num_heads=4), tok), tok)


def test_unfrozen_head_trains_lm_in_paper_format(tok):
    """freeze_lm=False with zero visual tokens: how a fresh LM can first learn reports after the paper's prompt."""
    torch.manual_seed(0)
    lm = build_report_lm(TINY, tok)
    model = VisualPrefixLM(lm, tok, VISUAL_DIM, freeze_lm=False)
    model.train()
    assert lm.training and all(p.requires_grad for p in lm.parameters())
    assert any(k.startswith("lm.") for k in model.state_dict())
    empty = torch.zeros(len(REPORTS), 0, VISUAL_DIM)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(empty, REPORTS)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- slot conditioning

def test_condition_phrases_name_positives_and_uncertains_only():
    from cxpmrg_lib.models.report_lm import condition_phrases

    row = {"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumothorax": 0.0, "Pleural Effusion": float("nan"),
           "Support Devices": 1.0}
    assert condition_phrases(row) == ["cardiomegaly", "possible edema", "support devices"]
    assert condition_phrases({"No Finding": 1.0}) == ["no finding"]
    assert condition_phrases({}) == []


def test_condition_slot_places_each_phrase_and_fills_the_rest(tok):
    import cxpmrg_lib.models.report_lm as rl

    lm = build_report_lm(TINY, tok)
    head = VisualPrefixLM(lm, tok, 1, freeze_lm=False)
    embed = lm.get_input_embeddings()
    norm = lambda v: torch.nn.functional.layer_norm(v, v.shape[-1:])
    filler = norm(embed(torch.tensor([tok.convert_tokens_to_ids("<ImageHere>")]))[0])
    card = norm(embed(torch.tensor(tok("cardiomegaly", add_special_tokens=False)["input_ids"])).mean(0))
    old = rl.UNCONDITIONED_SHARE
    try:
        rl.UNCONDITIONED_SHARE = 0.0
        slot = head.condition_slot([["cardiomegaly"], []], 12, torch.Generator().manual_seed(0))
        assert slot.shape == (2, 12, TINY.hidden_size)
        is_card = torch.isclose(slot[0], card, atol=1e-5).all(-1)
        is_fill = torch.isclose(slot[0], filler, atol=1e-5).all(-1)
        assert is_card.sum() >= 1 and bool((is_card | is_fill).all())   # the phrase at least once, filler elsewhere
        assert torch.isclose(slot[1], filler, atol=1e-5).all()          # no phrase: filler only
        rl.UNCONDITIONED_SHARE = 1.0                                    # every study unconditioned
        slot = head.condition_slot([["cardiomegaly"]], 12, torch.Generator().manual_seed(0))
        assert torch.isclose(slot[0], filler, atol=1e-5).all()
    finally:
        rl.UNCONDITIONED_SHARE = old
    # layer-normalised like the projection's LayerNorm output: zero mean, unit variance per position
    assert torch.allclose(slot.mean(-1), torch.zeros(1, 12), atol=1e-5)


def test_an_lm_pretrained_with_conditioning_reads_its_slot(tok):
    """The mechanism against the collapse: an LM trained with the findings in the slot writes the report
    the slot states; the loss with the right slot is lower than with another study's."""
    import cxpmrg_lib.models.report_lm as rl

    torch.manual_seed(0)
    reports = ["Mild cardiomegaly with small left pleural effusion.", "Lungs are clear bilaterally."]
    phrases = [["cardiomegaly", "pleural effusion"], ["no finding"]]
    lm = build_report_lm(TINY, tok)
    head = VisualPrefixLM(lm, tok, 1, prompt=SHORT_PROMPT, freeze_lm=False)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    old = rl.UNCONDITIONED_SHARE
    rl.UNCONDITIONED_SHARE = 0.0
    try:
        for _ in range(60):
            loss = head(None, reports, slot=head.condition_slot(phrases, 8))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            right = head(None, reports, slot=head.condition_slot(phrases, 8))["loss"].item()
            wrong = head(None, reports, slot=head.condition_slot(phrases[::-1], 8))["loss"].item()
    finally:
        rl.UNCONDITIONED_SHARE = old
    assert right < 0.2 and wrong > 2 * right, (right, wrong)


def test_projection_parameters_carry_the_lr_scale(tok):
    from cxpmrg_lib.trainer import TrainConfig, build_optimizer

    head = VisualPrefixLM(build_report_lm(TINY, tok), tok, VISUAL_DIM, proj_lr_scale=10.0)
    opt = build_optimizer(head, TrainConfig(lr=1e-4))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [pytest.approx(1e-3)]          # only the projection trains (LM frozen), at 10x
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in head.parameters()
                                                                      if p.requires_grad}


# ----------------------------------------------------------------------------- guidance against the empty slot

def _guided_greedy_by_hand(model, visual, scale, n):
    """n greedy tokens, each step scored from two full forward passes (no cache): the reference."""
    lm, embed = model.lm, model.lm.get_input_embeddings()
    cond_prefix = model._prefix_embeds(visual)
    empty_prefix = model._prefix_embeds(None, slot=model.condition_slot([[]] * len(visual), visual.shape[1]))
    ids = torch.zeros(len(visual), 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            cond = torch.log_softmax(lm(inputs_embeds=torch.cat([cond_prefix, embed(ids)], 1)).logits[:, -1], -1)
            empty = torch.log_softmax(lm(inputs_embeds=torch.cat([empty_prefix, embed(ids)], 1)).logits[:, -1], -1)
            mixed = empty + scale * (cond - empty)
            mixed[:, model.eos_id] = float("-inf")       # what min_new_tokens does
            ids = torch.cat([ids, mixed.argmax(-1, keepdim=True)], 1)
    return [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)]


def test_guidance_off_is_plain_decoding_and_on_matches_the_two_pass_reference(trained):
    model, visual, _, _ = trained
    plain = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert model.generate(visual, guidance=1.0, **plain) == model.generate(visual, **plain)
    n = 10
    for scale in (0.0, 2.0, 4.0):
        guided = model.generate(visual, guidance=scale, min_new_tokens=n, max_new_tokens=n, **plain)
        assert guided == _guided_greedy_by_hand(model, visual, scale, n), scale
    # scale 0 is the empty slot alone: the same report whatever the image
    assert len(set(model.generate(visual, guidance=0.0, **plain))) == 1
    # beam search (sequences reordered between steps: the empty-slot branch is recomputed) is deterministic
    # and batch-independent
    beam = model.generate(visual, num_beams=3, guidance=2.0)
    assert [model.generate(visual[i:i + 1], num_beams=3, guidance=2.0)[0] for i in range(4)] == beam
    with pytest.raises(ValueError, match="guidance scale"):
        model.generate(visual, guidance=-1.0)
