"""TIMER-style: token-imbalance adaptation (after Wu, Huang and Huang, "Token Imbalance Adaptation for Radiology
Report Generation", CHIL 2023).

The mechanism: the words a report generator over-produces are the frequent ones of the training
reports, so the training loss adds an unlikelihood penalty (Welleck et al., ICLR 2020) on those
tokens: at every report position, -sum over the penalised tokens c other than the target of
log(1 - p(c)), which lowers their probability wherever they are not the word to write, on top of the
cross-entropy. The penalised set is fixed from the training corpus: every word whose share of the
training report tokens is at least `frequent_share` (specials never). Left out: TIMER's bilevel
optimisation that adapts the penalised set and its weights on validation data.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
import torch.nn.functional as F

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer
from cxpmrg_lib.models.zoo.transformer import TransformerConfig

__all__ = ["frequent_tokens", "unlikelihood_loss", "TIMERStyle"]


def frequent_tokens(vocab: WordVocab, reports: Iterable[str], share: float) -> torch.Tensor:
    """Ids of the vocabulary words whose share of all word tokens of `reports` is >= `share` (sorted)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    counts = Counter(i for r in reports for i in vocab.encode(r))
    total = sum(counts.values())
    if not total:
        raise ValueError("no words in the reports: nothing to count")
    ids = sorted(i for i, c in counts.items() if i >= len(WordVocab.SPECIALS) and c / total >= share)
    return torch.tensor(ids, dtype=torch.long)


def unlikelihood_loss(logits: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """Mean over the non-ignored positions of -sum_{c in candidates, c != target} log(1 - p(c)).
    logits (B, T, V), targets (B, T), candidates (K,) token ids."""
    if candidates.numel() == 0:
        return logits.new_zeros(())
    probs = F.softmax(logits.float(), dim=-1)[..., candidates]                  # (B, T, K)
    penalty = -torch.log1p(-probs.clamp(max=1 - 1e-6))
    penalty = penalty.masked_fill(targets.unsqueeze(-1) == candidates, 0.0)    # the target itself is not penalised
    keep = targets != ignore_index
    return penalty.sum(-1)[keep].mean() if bool(keep.any()) else logits.new_zeros(())


class TIMERStyle(ConditionedTransformer):
    """The Transformer trained with cross-entropy + `weight` * the unlikelihood of the `penalised` tokens."""

    def __init__(self, vocab: WordVocab, config: TransformerConfig, max_tokens: int, typical_tokens: int | None,
                 penalised: torch.Tensor, weight: float = 1.0):
        super().__init__(vocab, config, max_tokens, typical_tokens)
        if penalised.numel() and (int(penalised.min()) < len(WordVocab.SPECIALS) or int(penalised.max()) >= len(vocab)):
            raise ValueError("penalised tokens must be word ids of the vocabulary (no specials)")
        self.register_buffer("penalised", penalised.long().clone())
        self.weight = float(weight)

    def auxiliary_losses(self, aux, targets, logits, hidden, ids):
        return {"unlikelihood": self.weight * unlikelihood_loss(logits, ids[:, 1:], self.penalised, self.vocab.pad)}
