"""What the benchmark's encoder-decoder systems share: a word vocabulary, beam search, three small
visual extractors (a ResNet-style CNN, a ViT and a convolutional-token ViT), view pooling and a base class.

A zoo system is an nn.Module with the same two calls as MambaXray-VL's ReportModel, so the
trainer, `generate_reports` and the benchmark treat every system alike:

* `forward(images (B, M, 1, S, S), image_mask (B, M), reports: list[str]) -> {"loss": ...}`
* `generate(images, image_mask, num_beams=3, max_new_tokens=None, min_new_tokens=None,
  repetition_penalty=1.0, no_repeat_ngram_size=0) -> list[str]`

`CaptionModel` supplies both from two methods a subclass writes: `encode` (images -> memory)
and `logits` (memory, token prefix -> next-token logits at every position).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.vision_mamba import sincos_pos_embed_2d, study_tokens

__all__ = ["WordVocab", "beam_search", "sinusoid_positions", "SmallResNet", "PatchViT", "ConvTokenViT", "CaptionModel",
           "pool_views", "count_parameters"]

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[.,;:?!]")


class WordVocab:
    """Lower-cased words and punctuation seen at least `min_count` times in the training reports.

    ids: 0 pad, 1 bos, 2 eos, 3 unk, then words by falling frequency (ties alphabetical), so the
    vocabulary is a deterministic function of the reports.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    pad, bos, eos, unk = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]):
        self.itos = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(str(text).lower())

    @classmethod
    def build(cls, reports: Iterable[str], min_count: int = 3) -> "WordVocab":
        counts = Counter(w for r in reports for w in cls.split(r))
        if not counts:
            raise ValueError("no words in the training reports: cannot build a vocabulary")
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Word ids of `text` (no bos/eos), cut at `max_tokens`."""
        ids = [self.stoi.get(w, self.unk) for w in self.split(text)]
        return ids[:max_tokens] if max_tokens is not None else ids

    def batch(self, reports: Sequence[str], max_tokens: int) -> torch.Tensor:
        """(B, T) rows `bos words eos pad...`, words cut at max_tokens."""
        rows = [[self.bos] + self.encode(r, max_tokens) + [self.eos] for r in reports]
        out = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first eos, specials dropped, no space before punctuation."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i >= len(self.SPECIALS):
                words.append(self.itos[i])
        return re.sub(r" ([.,;:?!])", r"\1", " ".join(words))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordVocab":
        itos = json.loads(Path(path).read_text())["itos"]
        if list(itos[:4]) != list(cls.SPECIALS):
            raise ValueError(f"{path} is not a WordVocab file")
        return cls(itos[4:])


def _ban_repeated_ngrams(tokens: torch.Tensor, logp: torch.Tensor, n: int) -> None:
    """Set -inf on every next token that would repeat an n-gram already in its row (in place)."""
    t = tokens.shape[1]
    if n <= 0 or t < n:
        return
    rows = tokens.tolist()
    for r, seq in enumerate(rows):
        prefix = tuple(seq[t - n + 1:]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(t - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
        if banned:
            logp[r, banned] = -math.inf


def beam_search(step: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], batch: int, bos: int, eos: int,
                max_len: int, min_len: int = 1, num_beams: int = 3, repetition_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, length_penalty: float = 1.0, device=None) -> list[list[int]]:
    """Beam search (greedy for num_beams=1) over `step(tokens (N, t), src) -> next-token logits (N, V)`.

    N = batch * num_beams rows, row b * num_beams + j being beam j of batch element b. `src` (N,)
    says which row of the previous call each row extends (None on the first call), so that a
    step function keeping a cache reorders it with `cache[src]`; rows never change batch element.
    Returns each element's best sequence of generated ids (no bos; eos and what follows dropped);
    scores are summed log-probs divided by length ** length_penalty. repetition_penalty > 1 divides
    the positive logits (multiplies the negative ones) of tokens already generated, as transformers does."""
    if num_beams < 1 or max_len < 1:
        raise ValueError(f"num_beams and max_len must be >= 1, got {num_beams}, {max_len}")
    k = num_beams
    src = None
    tokens = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = -math.inf                       # all beams start identical: keep one
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, device=device)
    for t in range(max_len):
        logits = step(tokens, src).float()
        if repetition_penalty != 1.0 and tokens.shape[1] > 1:
            seen = logits.gather(1, tokens[:, 1:])
            logits.scatter_(1, tokens[:, 1:], torch.where(seen > 0, seen / repetition_penalty,
                                                          seen * repetition_penalty))
        logp = F.log_softmax(logits, dim=-1)
        _ban_repeated_ngrams(tokens[:, 1:], logp, no_repeat_ngram_size)
        if t < min_len:
            logp[:, eos] = -math.inf
        # a finished beam continues with eos at no cost, so it keeps its score and place
        logp[done] = -math.inf
        logp[done, eos] = 0.0
        vocab = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(batch, k * vocab)
        new_len = lengths.view(batch, k, 1) + (~done).view(batch, k, 1).float()
        norm = new_len.expand(batch, k, vocab).reshape(batch, k * vocab).clamp(min=1) ** length_penalty
        top = (cand / norm).topk(k, dim=1).indices       # rank by normalised score
        scores = cand.gather(1, top)
        beam, word = top // vocab, top % vocab
        src = (torch.arange(batch, device=tokens.device)[:, None] * k + beam).view(-1)
        tokens = torch.cat([tokens[src], word.view(-1, 1)], dim=1)
        lengths = lengths[src] + (~done[src]).float()
        done = done[src] | (word.view(-1) == eos)
        if bool(done.all()):
            break
    final = scores / lengths.view(batch, k).clamp(min=1) ** length_penalty
    best = final.argmax(dim=1)
    out = []
    for b in range(batch):
        seq = tokens[b * k + int(best[b]), 1:].tolist()
        out.append(seq[:seq.index(eos)] if eos in seq else seq)
    return out


def sinusoid_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """Fixed sine-cosine positions of Vaswani et al., (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, :dim // 2]
    return out


def pool_views(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               image_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, M, C, S, S) views -> (B, T, D) tokens of `extract` averaged over each study's real views."""
    return study_tokens(lambda x: SimpleNamespace(tokens=extract(x)), images, image_mask)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN (the R2Gen family's ResNet-101 patch features, scaled down): a stride-2 stem
    and max-pool, then one basic block per width (the first at stride 1, the others at stride 2).
    Tokens (B, grid*grid, dim): with three widths, grid = S / 16 (8x8 at 128 px, like the Mamba encoder)."""

    def __init__(self, dim: int = 192, widths: Sequence[int] = (32, 64, 128), in_chans: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(cin, dim)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            x = x.mean(1, keepdim=True) if self.in_chans == 1 else x.expand(-1, self.in_chans, -1, -1)
        f = self.blocks(self.stem(x))                          # (B, C, g, g)
        return self.proj(f.flatten(2).transpose(1, 2))


class PatchViT(nn.Module):
    """A small pre-norm ViT over non-overlapping patches with fixed 2-D sin-cos positions; tokens (B, N, dim)."""

    def __init__(self, image_size: int = 128, patch_size: int = 16, dim: int = 192, depth: int = 4,
                 heads: int = 4, in_chans: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.in_chans, self.image_size = in_chans, image_size
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        grid = image_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            x = x.mean(1, keepdim=True) if self.in_chans == 1 else x.expand(-1, self.in_chans, -1, -1)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(x))


class ConvTokenViT(nn.Module):
    """Convolutional token embedding (a small ResNet: overlapping, strided convolutions) followed by
    pre-norm transformer layers: the CvT idea at a few million parameters. The CvT2DistilGPT2-style
    encoder, and the R2GenGPT-style one as the stand-in for its hierarchical Swin (a plain patch ViT
    learned little of the findings in the benchmark's budget). Tokens (B, (S/16)^2, dim)."""

    def __init__(self, dim: int, depth: int = 2, heads: int = 4, in_chans: int = 1):
        super().__init__()
        self.embed = SmallResNet(dim=dim, in_chans=in_chans)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class CaptionModel(nn.Module):
    """Base of the word-level encoder-decoder systems. Subclasses set `self.vocab` (WordVocab) and
    `self.max_tokens` (report words supervised), and write:

    * `encode(images, image_mask) -> memory`: a tensor, or a tuple of tensors, batch first;
    * `logits(memory, tokens (B, t)) -> (B, t, V)`: next-token logits at every position, tokens
      starting with bos (teacher forcing uses it; so does generation unless `decode_step` exists).

    and, for fast generation, optionally `decode_step(memory, tokens (N, t), cache) -> (logits (N, V),
    cache)`: the next-token logits of the last position, given what the previous call returned as
    `cache` (None on the first call, when tokens is just bos); a cache is a tensor or a tuple of
    tensors, batch first, which beam search reorders with `select`.
    """

    vocab: WordVocab
    max_tokens: int = 100
    typical_tokens: int | None = None   # median training report length in words: sets the decoding budget

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None):
        raise NotImplementedError

    def logits(self, memory, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def select(memory, rows: torch.Tensor):
        """The memory of batch rows `rows` (beams share their study's memory)."""
        if isinstance(memory, tuple):
            return tuple(m.index_select(0, rows) if torch.is_tensor(m) else m for m in memory)
        return memory.index_select(0, rows)

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor | None, reports: list[str]) -> dict:
        ids = self.vocab.batch(reports, self.max_tokens).to(images.device)
        out = self.logits(self.encode(images, image_mask), ids[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               ignore_index=self.vocab.pad)
        return {"loss": loss}

    def decoding_budget(self, min_new_tokens: int | None, max_new_tokens: int | None) -> tuple[int, int]:
        """Defaults: 0.5x and 1.5x the typical training report (as for MambaXray-VL), capped at what training saw."""
        typical = self.typical_tokens or self.max_tokens // 2
        hi = max_new_tokens if max_new_tokens is not None else min(math.ceil(1.5 * typical), self.max_tokens + 1)
        lo = min_new_tokens if min_new_tokens is not None else max(1, round(0.5 * typical))
        return min(lo, hi), hi

    @torch.no_grad()
    def generate(self, images: torch.Tensor, image_mask: torch.Tensor | None = None, num_beams: int = 3,
                 max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, length_penalty: float = 1.0,
                 **_ignored) -> list[str]:
        was = self.training
        self.eval()
        try:
            lo, hi = self.decoding_budget(min_new_tokens, max_new_tokens)
            rows = torch.arange(images.shape[0], device=images.device).repeat_interleave(num_beams)
            memory = self.select(self.encode(images, image_mask), rows)   # beams stay with their study
            cache = None

            def step(tokens, src):
                nonlocal cache
                if not hasattr(self, "decode_step"):
                    out = self.logits(memory, tokens)[:, -1]
                else:
                    if cache is not None and src is not None:
                        cache = self.select(cache, src)
                    out, cache = self.decode_step(memory, tokens, cache)
                out = out.clone()
                out[:, [self.vocab.pad, self.vocab.bos]] = -math.inf     # never generated
                return out

            seqs = beam_search(step, images.shape[0], self.vocab.bos, self.vocab.eos, hi, lo, num_beams,
                               repetition_penalty, no_repeat_ngram_size, length_penalty, device=images.device)
            return [self.vocab.decode(s) for s in seqs]
        finally:
            self.train(was)
