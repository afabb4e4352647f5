"""Guidance against the empty image slot: a decoding option of the frozen-LM head (VisualPrefixLM).

The report LM is pre-trained with a share of studies whose image slot holds filler only
(report_lm.UNCONDITIONED_SHARE), so beside p(report | image) it keeps a prior p(report | nothing):
what it writes when the slot says nothing, the most common (normal) report. Greedy decoding
under uncertainty falls back on that prior. Guidance scores each next token by

    log p(token | image) + (g - 1) * (log p(token | image) - log p(token | empty slot))

(classifier-free guidance, Ho and Salimans 2022, applied to language models by Sanchez et al.
2023; the same contrast against a weakened visual input is visual contrastive decoding, Leng et
al. 2024): g = 1 is plain decoding, g > 1 moves each step away from what the prior alone would
write and toward what the image adds. The frozen LM and the trained weights are unchanged; it
costs a second LM pass per generated token (the empty-slot prompt is the same for every study,
so its cache is shared).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

__all__ = ["EmptySlotGuidance"]


class EmptySlotGuidance(LogitsProcessor):
    """A transformers LogitsProcessor that mixes the LM's next-token scores with those under
    `empty_prefix` (the (1, P, H) prompt embeddings with a filler-only image slot).

    Tokens another processor has ruled out (-inf: no-repeat n-grams, the minimum length) stay
    ruled out. Greedy search extends one cache of the empty-slot branch step by step; when the
    sequences were reordered or changed (beam search), the branch is recomputed over the
    sequences generated so far, so every search gets the same scores.
    """

    def __init__(self, lm, empty_prefix: torch.Tensor, scale: float):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.lm, self.prefix, self.scale = lm, empty_prefix, float(scale)
        self._cache = None
        self._seen: torch.Tensor | None = None

    def _empty_slot_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        seen = self._seen
        # every position is attended: a finished sequence's padding changes only scores nobody reads
        mask = torch.ones(b, self.prefix.shape[1] + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        if seen is not None and seen.shape[0] == b and input_ids.shape[1] == seen.shape[1] + 1 \
                and torch.equal(input_ids[:, :-1], seen):
            out = self.lm(input_ids=input_ids[:, -1:], attention_mask=mask, past_key_values=self._cache,
                          use_cache=True)
        else:
            embeds = torch.cat([self.prefix.expand(b, -1, -1),
                                self.lm.get_input_embeddings()(input_ids)], dim=1)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        self._cache, self._seen = out.past_key_values, input_ids
        return out.logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.scale == 1.0:
            return scores
        cond = torch.log_softmax(scores.float(), dim=-1)
        empty = torch.log_softmax(self._empty_slot_logits(input_ids).float(), dim=-1)
        mixed = empty + self.scale * (cond - empty)
        return mixed.masked_fill(torch.isneginf(cond), float("-inf")).to(scores.dtype)
