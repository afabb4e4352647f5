"""The Transformer baseline opened up where the benchmark's mechanism systems act on it.

PromptMRG-, M2KT-, XProNet-, TIMER- and WCL-style each add one mechanism to an encoder-decoder; here
they all add it to the benchmark's Transformer (`TransformerReportModel`: the same CNN, encoder,
decoder and sizes), so that each row differs from the Transformer row by its mechanism alone.
`ConditionedTransformer` is that Transformer with four places a subclass may fill:

* `state(images, image_mask, targets)` -> ((memory, prefix, context), aux): the memory the decoder
  attends to (M2KT adds label-knowledge tokens to it), embeddings the decoder reads before bos
  (PromptMRG's prompt tokens; None for none), and whatever the word inputs need (XProNet's predicted
  label probabilities; None for nothing). `aux` keeps what an auxiliary loss reads. `targets` are the
  study's training targets (labels, cluster ids) or None: at test time a model never gets them.
* `embed_words(tokens, state, start)`: the decoder's word inputs (XProNet adds its prototype response).
* `auxiliary_losses(aux, targets, logits, hidden, ids)` -> {name: loss}, added to the report
  cross-entropy (a classifier's loss, an unlikelihood penalty, a contrastive loss).
* `needs_targets`: True when training cannot do without `targets` (forward refuses to train without).

The prefix positions carry no word position (each prompt embedding is its own learned row); word
positions start at 0 at bos whatever the prefix. Decoding is cached as in the Transformer; the first
step runs the prefix and bos together.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.transformer import TransformerConfig, TransformerReportModel

__all__ = ["ConditionedTransformer", "pooled"]


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, d) -> (B, d): the study feature a classifier or a contrastive loss reads."""
    return tokens.mean(1)


class ConditionedTransformer(TransformerReportModel):
    needs_targets = False

    def __init__(self, vocab: WordVocab, config: TransformerConfig = TransformerConfig(), max_tokens: int = 100,
                 typical_tokens: int | None = None):
        super().__init__(vocab, config, max_tokens, typical_tokens)

    # ------------------------------------------------------------------ the hooks
    def features(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """The Transformer's encoded visual tokens (B, N, d)."""
        return TransformerReportModel.encode(self, images, image_mask)

    def state(self, images: torch.Tensor, image_mask: torch.Tensor | None, targets: torch.Tensor | None = None):
        memory = self.features(images, image_mask)
        return (memory, None, None), {"features": memory}

    def embed_words(self, tokens: torch.Tensor, state, start: int = 0) -> torch.Tensor:
        t = tokens.shape[1]
        return self.embed(tokens) * math.sqrt(self.config.d_model) + self.positions[start:start + t]

    def auxiliary_losses(self, aux: dict, targets: torch.Tensor | None, logits: torch.Tensor, hidden: torch.Tensor,
                         ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    # ------------------------------------------------------------------ CaptionModel
    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None):
        return self.state(images, image_mask)[0]

    def hidden(self, state, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (B, t, d) at the word positions (teacher forcing: tokens start with bos)."""
        memory, prefix, _ = state
        x = self.embed_words(tokens, state)
        pad = tokens == self.vocab.pad
        p = 0 if prefix is None else prefix.shape[1]
        if p:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            pad = torch.cat([torch.zeros(pad.shape[0], p, dtype=torch.bool, device=pad.device), pad], dim=1)
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)   # True: may not attend
        y = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=pad)
        return y[:, p:]

    def logits(self, state, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.hidden(state, tokens)))

    def decode_step(self, state, tokens: torch.Tensor, cache):
        """The last position's logits, reusing the earlier positions' normed layer inputs (the prefix's
        too: on the first call, with cache None, the prefix and bos run together). Eval mode."""
        memory, prefix, _ = state
        t = tokens.shape[1]
        if (cache is None) != (t == 1):
            raise ValueError(f"decode_step needs a cache exactly when the prefix is longer than bos, got "
                             f"{t} tokens and cache {'None' if cache is None else 'set'}")
        x = self.embed_words(tokens[:, -1:], state, start=t - 1)
        if cache is None and prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):       # norm_first layers, as in hidden()
            h = layer.norm1(x)
            keys = h if cache is None else torch.cat([cache[i], h], dim=1)
            n, total = h.shape[1], keys.shape[1]
            mask = (torch.ones(n, total, dtype=torch.bool, device=h.device).triu(total - n + 1) if n > 1 else None)
            new_cache.append(keys)
            x = x + layer.dropout1(layer.self_attn(h, keys, keys, attn_mask=mask, need_weights=False)[0])
            x = x + layer.dropout2(layer.multihead_attn(layer.norm2(x), memory, memory, need_weights=False)[0])
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        return self.out(self.norm(x))[:, -1], tuple(new_cache)

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor | None, reports: list[str],
                targets: torch.Tensor | None = None) -> dict:
        """{"loss": report cross-entropy + the auxiliary losses, "report_loss", and each auxiliary loss}."""
        if self.needs_targets and targets is None and self.training:
            raise ValueError(f"{type(self).__name__} trains on per-study targets (labels or clusters of the "
                             "training split): pass targets=, as the benchmark's runner does")
        ids = self.vocab.batch(reports, self.max_tokens).to(images.device)
        state, aux = self.state(images, image_mask, targets)
        hidden = self.hidden(state, ids[:, :-1])
        logits = self.out(self.norm(hidden))
        report_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                      ignore_index=self.vocab.pad)
        extra = self.auxiliary_losses(aux, targets, logits, hidden, ids)
        loss = report_loss + sum(extra.values()) if extra else report_loss
        return {"loss": loss, "report_loss": report_loss.detach(), **{k: v.detach() for k, v in extra.items()}}
