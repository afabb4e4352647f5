"""R2Gen (relational memory + MCLN) and R2GenCMN (cross-modal memory): shapes, causality, the memories at
work, cached decoding, overfitting two reports, beam search over masked views, parameter counts."""
import json

import pytest
import torch
from torch import nn

from cxpmrg_lib.models.zoo.cmn import CMNConfig, R2GenCMN
from cxpmrg_lib.models.zoo.common import WordVocab, count_parameters
from cxpmrg_lib.models.zoo.r2gen import MemoryConditionalLayerNorm, R2Gen, R2GenConfig, attend

REPORTS = ["the heart is normal. no effusion.", "the heart is enlarged. small left effusion."]
SMALL = dict(d_model=64, num_encoder_layers=2, num_decoder_layers=2, num_heads=2, d_ff=128, dropout=0.0,
             image_size=64, visual_widths=(16, 32, 64))
SYSTEMS = {"r2gen": (R2Gen, R2GenConfig, {}), "cmn": (R2GenCMN, CMNConfig, {"memory_slots": 64, "topk": 8})}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models run tiny ops one after another (the RM is a loop over tokens): a second thread only adds
    synchronisation, which costs ~10x when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vocab(n_words: int | None = None) -> WordVocab:
    if n_words is None:
        return WordVocab.build(REPORTS, min_count=1)
    return WordVocab([f"w{i}" for i in range(n_words)])


def _small(name: str, vocab: WordVocab | None = None, seed: int = 0):
    cls, cfg, extra = SYSTEMS[name]
    torch.manual_seed(seed)
    return cls(vocab or _vocab(), cfg(**SMALL, **extra), max_tokens=20, typical_tokens=8)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_tiny_config_shapes_loss_and_bad_image_size(name):
    cls, cfg, _ = SYSTEMS[name]
    config = cfg()
    assert json.loads(json.dumps(config.to_dict())) == {**config.to_dict(), "visual_widths": [32, 64, 128]}
    torch.manual_seed(0)
    vocab = _vocab(96)
    model = cls(vocab, config, max_tokens=30, typical_tokens=12)
    assert (model.config, model.vocab, model.max_tokens, model.typical_tokens) == (config, vocab, 30, 12)
    images = torch.randn(2, 2, 1, 128, 128)
    mask = torch.tensor([[True, True], [True, False]])
    memory = model.encode(images, mask)
    assert memory.shape == (2, 64, 192)
    tokens = vocab.batch(["w1 w2 w3 w4", "w5"], max_tokens=30)
    assert model.logits(memory, tokens).shape == (2, 6, 100)
    loss = model(images, mask, ["w1 w2 w3 w4", "w5"])["loss"]
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 1.5   # near uniform at init
    with pytest.raises(ValueError, match="128 px"):
        model.encode(torch.randn(1, 1, 1, 64, 64), None)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_later_tokens_do_not_change_earlier_logits(name):
    model = _small(name, _vocab(40)).eval()
    memory = model.encode(torch.randn(2, 1, 1, 64, 64), None)
    tokens = torch.randint(4, 44, (2, 10))
    tokens[:, 0] = WordVocab.bos
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] - 4 + 1) % 40 + 4
    with torch.no_grad():
        a, b = model.logits(memory, tokens), model.logits(memory, changed)
        padded = model.logits(memory, torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 1e-3                 # every later position moves
    torch.testing.assert_close(padded[:, :10], a, rtol=0, atol=1e-5)          # trailing pads change nothing


def test_relational_memory_follows_the_prefix_and_drives_the_decoder():
    model = _small("r2gen", _vocab(40)).eval()
    tokens = torch.randint(4, 44, (2, 8))
    tokens[:, 0] = WordVocab.bos
    other = tokens.clone()
    other[:, 3] = (other[:, 3] - 4 + 1) % 40 + 4
    with torch.no_grad():
        states, states_other = model.relational_memory(tokens), model.relational_memory(other)
        prefix_states = model.relational_memory(tokens[:, :5])
    slots, width = model.config.rm_num_slots, model.config.d_model
    assert states.shape == (2, 8, slots, width)
    # deterministic and causal: the states of a prefix are the first states of the whole sequence
    torch.testing.assert_close(prefix_states, states[:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(states[:, :3], states_other[:, :3], rtol=0, atol=0)
    assert (states[:, 3:] - states_other[:, 3:]).flatten(2).abs().amax(-1).min() > 1e-3
    # it is rewritten at every token and leaves the initial memory
    assert (states[:, 1:] - states[:, :-1]).flatten(2).abs().amax(-1).min() > 1e-3
    assert (states[:, 0] - model.rm.initial).abs().amax() > 1e-2
    # the decoder reads it through the MCLNs: 3 per layer and a final one
    mclns = [m for m in model.modules() if isinstance(m, MemoryConditionalLayerNorm)]
    assert len(mclns) == 3 * model.config.num_decoder_layers + 1
    memory = model.encode(torch.randn(2, 1, 1, 64, 64), None)
    with torch.no_grad():
        before = model.logits(memory, tokens)
        model.rm.initial.mul_(-1.0)
        after = model.logits(memory, tokens)
    assert (before - after).abs().amax() > 1e-3


def test_cross_modal_memory_reads_only_the_topk_slots_and_depends_on_the_input():
    model = _small("cmn").eval()
    cmn = model.cmn
    heads, width = model.config.num_heads, model.config.d_model // model.config.num_heads
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        base = cmn(x)
        assert (cmn(torch.randn(1, 1, 64)) - base).abs().amax() > 1e-3
        q = cmn.query(x)[0, 0].view(heads, width)
        k = cmn.key(cmn.memory).view(-1, heads, width)
        scores = torch.einsum("hd,nhd->hn", q, k)                      # (heads, slots)
        margin = (scores - scores.topk(cmn.topk, dim=1).values[:, -1:]).amax(0)   # >= 0: some head reads it
        read, unread = margin.argmax(), margin.argmin()
        assert int((margin >= 0).sum()) <= heads * cmn.topk < 64
        cmn.memory[unread] += 1e-3 * torch.randn(64)                   # stays outside every top-k
        torch.testing.assert_close(cmn(x), base, rtol=0, atol=1e-6)
        cmn.memory[read] += 0.5 * cmn.memory[read]
        assert (cmn(x) - base).abs().amax() > 1e-4
    # the decoder reads the memory too
    memory = model.encode(torch.randn(1, 1, 1, 64, 64), None)
    tokens = torch.tensor([[WordVocab.bos, 5, 6, 7]])
    with torch.no_grad():
        before = model.logits(memory, tokens)
        cmn.memory.mul_(-1.0)
        assert (model.logits(memory, tokens) - before).abs().amax() > 1e-3


def test_attend_folds_the_projections_and_matches_multihead_attention():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True).eval()
    with torch.no_grad():                   # biases start at zero: give them values, as training would
        attn.in_proj_bias.normal_(std=0.5)
        attn.out_proj.bias.normal_(std=0.5)
    query, source = torch.randn(3, 2, 32), torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        for mask in (None, pad):
            expected = attn(query, source, source, key_padding_mask=mask, need_weights=False)[0]
            torch.testing.assert_close(attend(attn, query, source, mask), expected, rtol=0, atol=1e-5)
        assert (attend(attn, query, source, pad) - attend(attn, query, source))[1].abs().amax() > 1e-3
    with pytest.raises(ValueError, match="eval mode"):
        attend(attn.train(), query, source)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_cached_decoding_equals_full_recompute(name, monkeypatch):
    model = _small(name, _vocab(40)).eval()
    with torch.no_grad():                   # non-zero attention biases, as after training
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_(std=0.5)
    images = torch.randn(2, 2, 1, 64, 64)
    mask = torch.tensor([[True, True], [True, False]])
    tokens = torch.randint(4, 44, (2, 12))
    tokens[:, 0] = WordVocab.bos
    tokens[1, 5] = WordVocab.pad            # a pad inside the prefix: both paths must ignore it as a key
    with torch.no_grad():
        memory = model.encode(images, mask)
        full = model.logits(memory, tokens)
        cache = None
        for t in range(1, tokens.shape[1] + 1):
            step, cache = model.decode_step(memory, tokens[:, :t], cache)
            torch.testing.assert_close(step, full[:, t - 1], rtol=0, atol=1e-5, msg=f"{name} position {t - 1}")
        layers = model.config.num_decoder_layers
        if name == "r2gen":                 # the RM after the prefix, then each layer's normed inputs
            assert len(cache) == 1 + layers
            torch.testing.assert_close(cache[0], model.relational_memory(tokens)[:, -1], rtol=0, atol=1e-5)
        assert [tuple(c.shape) for c in cache[-layers:]] == [(2, 12, model.config.d_model)] * layers
        with pytest.raises(ValueError, match="cache"):
            model.decode_step(memory, tokens[:, :3], None)
    # generation through the cache gives what the uncached path gives
    kwargs = dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=6, max_new_tokens=14)
    cached = model.generate(images, mask, **kwargs)
    monkeypatch.delattr(type(model), "decode_step")
    assert not hasattr(model, "decode_step")
    assert model.generate(images, mask, **kwargs) == cached


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_overfits_two_reports_from_two_images(name):
    model = _small(name)
    images = torch.randn(2, 1, 1, 64, 64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(150):
        loss = model(images, None, REPORTS)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05, f"{name} did not fit two reports: loss {loss.item():.3f} after {step + 1} steps"
    assert model.generate(images, None, num_beams=1, min_new_tokens=1, max_new_tokens=15) == REPORTS
    assert model.generate(images.flip(0), None, num_beams=1, min_new_tokens=1, max_new_tokens=15) == REPORTS[::-1]


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_beam_search_over_a_masked_second_view(name):
    model = _small(name)
    images = torch.randn(2, 2, 1, 64, 64)
    mask = torch.tensor([[True, True], [True, False]])
    out = model.generate(images, mask, num_beams=3, min_new_tokens=2, max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(s, str) and 2 <= len(s.split()) <= 6 for s in out)
    assert model.training                                   # generate restores the mode
    model.eval()
    moved = images.clone()
    moved[1, 1] = torch.randn(1, 64, 64)                    # the masked-out view: must not matter
    with torch.no_grad():
        torch.testing.assert_close(model.encode(moved, mask), model.encode(images, mask), rtol=0, atol=1e-6)
        moved[1, 0] = torch.randn(1, 64, 64)                # a real view: must matter
        assert (model.encode(moved, mask)[1] - model.encode(images, mask)[1]).abs().amax() > 1e-3
    moved[1, 0] = images[1, 0]                              # back to the real view; the masked one still moved
    assert model.generate(moved, mask, num_beams=3, min_new_tokens=2, max_new_tokens=6) == \
        model.generate(images, mask, num_beams=3, min_new_tokens=2, max_new_tokens=6)


def test_parameter_counts_at_the_tiny_config():
    counts = {}
    for name, (cls, cfg, _) in SYSTEMS.items():
        small_v, big_v = (cls(_vocab(n), cfg()) for n in (96, 996))
        trainable, total = count_parameters(small_v)
        assert trainable == total
        # the vocabulary enters twice, untied: word embedding and output layer (+ its bias)
        assert count_parameters(big_v)[1] - total == 900 * (2 * 192 + 1)
        counts[name] = count_parameters(big_v)[1]
        if name == "r2gen":   # 10 MCLNs: gamma, beta and two MLPs (3 slots * 192 -> 192 -> 192) each
            mclns = [m for m in big_v.modules() if isinstance(m, MemoryConditionalLayerNorm)]
            assert len(mclns) == 10
            assert sum(count_parameters(m)[1] for m in mclns) == 10 * (2 * 192 + 2 * (577 * 192 + 193 * 192))
    assert 6.0e6 < counts["r2gen"] < 7.0e6, counts        # 6,569,608 at 1000 words
    assert 3.2e6 < counts["cmn"] < 3.8e6, counts          # 3,488,776 at 1000 words
