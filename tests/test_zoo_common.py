"""Shared pieces of the benchmark zoo: word vocabulary, beam search, extractors, the caption base."""
import math

import pytest
import torch
from torch import nn

from cxpmrg_lib.models.zoo.common import (CaptionModel, PatchViT, SmallResNet, WordVocab, beam_search,
                                          count_parameters)


def test_vocab_is_deterministic_and_round_trips(tmp_path):
    reports = ["The heart is normal. No effusion.", "the heart is enlarged.", "No effusion, no edema."] * 3
    v = WordVocab.build(reports, min_count=3)
    assert v.itos[:4] == list(WordVocab.SPECIALS)
    assert v.itos[4:7] == [".", "heart", "is"] or v.itos[4] == "."    # by frequency, ties alphabetical
    assert WordVocab.build(list(reversed(reports)), min_count=3).itos == v.itos
    ids = v.batch(["the heart is normal.", "zebra"], max_tokens=10)
    assert ids[0, 0] == v.bos and v.eos in ids[0].tolist() and ids[1, 1] == v.unk
    assert v.decode(ids[0, 1:]) == "the heart is normal."
    assert v.batch(["a b c d e f"], max_tokens=2).shape == (1, 4)       # bos + 2 words + eos
    v.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").itos == v.itos
    with pytest.raises(ValueError):
        WordVocab.build(["", "  "])


def _chain(table):
    """A step function from a next-token log-prob table indexed by the last token."""
    table = torch.tensor(table, dtype=torch.float)

    def step(tokens, src):
        return table[tokens[:, -1]]
    return step


def test_beam_search_finds_the_better_sequence_greedy_misses():
    # tokens: 0 bos, 1 eos, 2 a, 3 b. Greedy takes a (0.6) then a->eos 0.5 : 0.30;
    # beam finds b (0.4) then b->eos 0.9 : 0.36.
    p = [[0, 0, 0.6, 0.4], [0, 1, 0, 0], [0, 0.5, 0.25, 0.25], [0, 0.9, 0.05, 0.05]]
    logp = [[math.log(x) if x > 0 else -1e9 for x in row] for row in p]
    step = _chain(logp)
    assert beam_search(step, 2, bos=0, eos=1, max_len=5, num_beams=1, length_penalty=0.0) == [[2], [2]]
    assert beam_search(step, 2, bos=0, eos=1, max_len=5, num_beams=2, length_penalty=0.0) == [[3], [3]]
    # min_len forbids the early eos
    out = beam_search(step, 1, bos=0, eos=1, max_len=5, min_len=3, num_beams=2, length_penalty=0.0)
    assert len(out[0]) >= 3


def test_beam_search_bans_repeated_ngrams_and_respects_max_len():
    # a chain that always prefers token 2 again
    step = _chain([[-9, -5, 0, -1]] * 4)
    free = beam_search(step, 1, bos=0, eos=1, max_len=6, num_beams=1)[0]
    assert free == [2] * 6
    banned = beam_search(step, 1, bos=0, eos=1, max_len=6, num_beams=1, no_repeat_ngram_size=2)[0]
    pairs = list(zip(banned, banned[1:]))
    assert len(pairs) == len(set(pairs))


class _Toy(CaptionModel):
    def __init__(self):
        super().__init__()
        self.vocab = WordVocab.build(["a b c ."] * 3, min_count=1)
        self.max_tokens = 8
        self.enc = nn.Linear(4, 16)
        self.emb = nn.Embedding(len(self.vocab), 16)
        self.out = nn.Linear(16, len(self.vocab))

    def encode(self, images, image_mask):
        return self.enc(images.flatten(1)[:, :4])

    def logits(self, memory, tokens):
        return self.out(self.emb(tokens) + memory[:, None])


def test_caption_base_trains_and_generates():
    torch.manual_seed(0)
    m = _Toy()
    images = torch.randn(2, 1, 1, 4, 4)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(80):
        loss = m(images, None, ["a b c.", "a b c."])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert m.generate(images, None, num_beams=2, min_new_tokens=1) == ["a b c.", "a b c."]
    assert m.training


def test_extractors_give_token_grids():
    x = torch.randn(2, 1, 128, 128)
    assert SmallResNet(dim=48)(x).shape == (2, 64, 48)
    vit = PatchViT(128, 16, dim=48, depth=1, heads=2)
    assert vit(x).shape == (2, 64, 48)
    trainable, total = count_parameters(vit)
    assert trainable == total > 0


def test_transformer_cached_decoding_equals_full_recompute(monkeypatch):
    from cxpmrg_lib.models.zoo.transformer import TransformerConfig, TransformerReportModel

    torch.manual_seed(0)
    vocab = WordVocab.build(["the heart is normal . no effusion . mild edema"] * 3, min_count=1)
    m = TransformerReportModel(vocab, TransformerConfig(image_size=32, d_model=32, encoder_layers=1, visual_widths=(8, 16),
                                                        decoder_layers=2, heads=2, ff=64), max_tokens=12,
                               typical_tokens=6).eval()
    images = torch.randn(2, 2, 1, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        memory = m.encode(images, mask)
        tokens = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 4, 5, 5]])
        full = m.logits(memory, tokens)
        cache = None
        for t in range(1, tokens.shape[1] + 1):
            step, cache = m.decode_step(memory, tokens[:, :t], cache)
            assert torch.allclose(step, full[:, t - 1], atol=1e-5), t
    # generation through the cache gives what the uncached path gives
    cached = m.generate(images, mask, num_beams=3, no_repeat_ngram_size=2)
    monkeypatch.delattr(TransformerReportModel, "decode_step")
    assert m.generate(images, mask, num_beams=3, no_repeat_ngram_size=2) == cached
