"""The plain Transformer encoder-decoder: the "Base" model of the R2Gen paper (Chen et al., EMNLP 2020).

As in that paper, the Base model has R2Gen's visual extractor and standard Transformer layers: the
same small ResNet-style CNN as R2Gen here (8x8 patch features at 128 px, views averaged), a
Transformer encoder over those features and a word-level Transformer decoder. It is the reference
point for the memory-driven variants (R2Gen, R2GenCMN): the same pipeline with standard layer norms
and nothing carried between generation steps but the prefix itself. (An earlier version put a small
ViT over image patches in front; with the benchmark's backbone pre-training that ViT learned little
of the findings in its 300 steps, BCE 0.66 -> 0.32, near the label prior, and the Transformer still
wrote one report for every study, where the CNN of R2Gen learned them.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cxpmrg_lib.models.zoo.common import CaptionModel, SmallResNet, WordVocab, pool_views, sinusoid_positions

__all__ = ["TransformerConfig", "TransformerReportModel"]


@dataclass
class TransformerConfig:
    image_size: int = 128
    d_model: int = 192
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 4
    ff: int = 512
    dropout: float = 0.1
    visual_widths: tuple = (32, 64, 128)     # R2Gen's visual extractor (models.zoo.r2gen.R2GenConfig)

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerReportModel(CaptionModel):
    def __init__(self, vocab: WordVocab, config: TransformerConfig = TransformerConfig(), max_tokens: int = 100,
                 typical_tokens: int | None = None):
        super().__init__()
        self.vocab, self.config = vocab, config
        self.max_tokens, self.typical_tokens = int(max_tokens), typical_tokens
        c = config
        self.visual = SmallResNet(dim=c.d_model, widths=c.visual_widths)
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, c.ff, c.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.encoder_layers, norm=nn.LayerNorm(c.d_model),
                                             enable_nested_tensor=False)
        self.embed = nn.Embedding(len(vocab), c.d_model, padding_idx=vocab.pad)
        # unit-scale embeddings after the sqrt(d) factor: a N(0, 1) table would make the words ~14x
        # the cross-attention output in the residual stream, and the decoder would ignore the image
        nn.init.normal_(self.embed.weight, std=c.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[vocab.pad].zero_()
        self.register_buffer("positions", sinusoid_positions(self.max_tokens + 2, c.d_model), persistent=False)
        layer = nn.TransformerDecoderLayer(c.d_model, c.heads, c.ff, c.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.decoder_layers)
        self.norm = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, len(vocab))

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(pool_views(self.visual, images, image_mask))

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.config.d_model) + self.positions[:t]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)   # True: may not attend
        y = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True,
                         tgt_key_padding_mask=tokens == self.vocab.pad)
        return self.out(self.norm(y))

    def decode_step(self, memory: torch.Tensor, tokens: torch.Tensor, cache):
        """The last position's logits, reusing the earlier positions' layer inputs (causal: they do
        not change as the report grows). cache: per layer, the normed inputs of positions 0..t-2."""
        t = tokens.shape[1]
        x = self.embed(tokens[:, -1:]) * math.sqrt(self.config.d_model) + self.positions[t - 1: t]
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):       # norm_first layers, as in forward
            h = layer.norm1(x)
            keys = h if cache is None else torch.cat([cache[i], h], dim=1)
            new_cache.append(keys)
            x = x + layer.dropout1(layer.self_attn(h, keys, keys, need_weights=False)[0])
            x = x + layer.dropout2(layer.multihead_attn(layer.norm2(x), memory, memory, need_weights=False)[0])
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        return self.out(self.norm(x))[:, -1], tuple(new_cache)
