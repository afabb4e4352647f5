"""R2GenCMN: the cross-modal memory network of Chen, Shen, Song and Wan, "Cross-modal Memory Networks for
Radiology Report Generation" (ACL 2021). The paper keeps R2Gen's plain Transformer encoder-decoder
(ResNet-101 patch features, 3+3 layers, d 512) and adds one memory matrix shared by both modalities
(2048 slots of 512): before the encoder every visual feature, and before the decoder every word
embedding, queries the memory with multi-head ("multi-thread") attention restricted to its top-k (32)
best-matching slots, and the weighted response is added to the feature. Here the same structure is
scaled down: a small ResNet-style CNN (`SmallResNet`) gives 8x8 tokens at 128 px, the views of a study
are averaged rather than concatenated, and the default sizes are tiny (d 192, 3+3 layers, 4 heads,
512 memory slots, top-32).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import CaptionModel, SmallResNet, WordVocab, pool_views
from cxpmrg_lib.models.zoo.r2gen import WordEmbedding, attend, causal_mask, check_image_size, transformer_encoder

__all__ = ["CMNConfig", "R2GenCMN", "CrossModalMemory"]


@dataclass
class CMNConfig:
    d_model: int = 192
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    memory_slots: int = 512
    topk: int = 32
    image_size: int = 128
    visual_widths: tuple[int, ...] = (32, 64, 128)

    def to_dict(self) -> dict:
        return asdict(self)


class CrossModalMemory(nn.Module):
    """A learned (slots, d) memory read by multi-head attention where each query keeps only its top-k slots
    (per head); returns the response, which the caller adds to its features."""

    def __init__(self, num_slots: int, d_model: int, num_heads: int, topk: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"memory width {d_model} is not divisible by {num_heads} heads")
        if not 1 <= topk <= num_slots:
            raise ValueError(f"topk must be in [1, {num_slots}] (the memory slots), got {topk}")
        self.memory = nn.Parameter(torch.randn(num_slots, d_model) * d_model ** -0.5)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.num_heads, self.topk, self.dropout = num_heads, topk, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) features -> (B, L, d) memory responses."""
        b, length, d = x.shape
        h = self.num_heads
        # every feature is a query of the one shared memory: fold the batch into the query axis, so that
        # the memory's keys and values are not copied per batch row
        q = self.query(x).view(b * length, h, -1).transpose(0, 1)[None]            # (1, h, B*L, dh)
        k = self.key(self.memory).view(-1, h, d // h).transpose(0, 1)[None]         # (1, h, N, dh)
        v = self.value(self.memory).view(-1, h, d // h).transpose(0, 1)[None]
        with torch.no_grad():                                   # which slots each query reads
            scores = q @ k.transpose(-1, -2)
            keep = scores >= scores.topk(self.topk, dim=-1).values[..., -1:]
        r = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out(r[0].transpose(0, 1).reshape(b, length, d))


def decoder_layer_step(layer: nn.TransformerDecoderLayer, x: torch.Tensor, past: torch.Tensor | None,
                       visual: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm-first `nn.TransformerDecoderLayer` (eval mode) for the last position only: x (B, 1, d); `past`
    the normed self-attention inputs of the earlier positions (B, t-1, d), which the causal mask leaves
    unchanged; pad (B, t) the padding of the whole prefix. Returns the output (B, 1, d) and `past` with
    this position."""
    h = layer.norm1(x)
    keys = h if past is None else torch.cat([past, h], dim=1)
    x = x + layer.dropout1(attend(layer.self_attn, h, keys, pad))
    x = x + layer.dropout2(attend(layer.multihead_attn, layer.norm2(x), visual))
    x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
    return x, keys


class R2GenCMN(CaptionModel):
    """Visual extractor -> (+ memory response) -> Transformer encoder; word embeddings (+ memory response) ->
    Transformer decoder. `encode` gives the encoded visual tokens (B, 64, d); `decode_step` carries each
    decoder layer's self-attention inputs from one generated token to the next."""

    def __init__(self, vocab: WordVocab, config: CMNConfig, max_tokens: int = 100,
                 typical_tokens: int | None = None):
        super().__init__()
        self.vocab, self.config = vocab, config
        self.max_tokens, self.typical_tokens = max_tokens, typical_tokens
        c = config
        self.visual = SmallResNet(dim=c.d_model, widths=c.visual_widths)
        self.att_embed = nn.Sequential(nn.ReLU(), nn.Dropout(c.dropout))
        self.cmn = CrossModalMemory(c.memory_slots, c.d_model, c.num_heads, c.topk, c.dropout)
        self.encoder = transformer_encoder(c.d_model, c.num_heads, c.d_ff, c.dropout, c.num_encoder_layers)
        self.embed = WordEmbedding(len(vocab), c.d_model, c.dropout, vocab.pad)
        layer = nn.TransformerDecoderLayer(c.d_model, c.num_heads, c.d_ff, c.dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.num_decoder_layers, norm=nn.LayerNorm(c.d_model))
        self.head = nn.Linear(c.d_model, len(vocab))

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        check_image_size(images, self.config.image_size, "R2GenCMN")
        feats = self.att_embed(pool_views(self.visual, images, image_mask))
        return self.encoder(feats + self.cmn(feats))

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.cmn(x)
        t = tokens.shape[1]
        out = self.decoder(x, memory, tgt_mask=causal_mask(t, tokens.device), tgt_is_causal=True,
                           tgt_key_padding_mask=tokens == self.vocab.pad)
        return self.head(out)

    def decode_step(self, memory: torch.Tensor, tokens: torch.Tensor, cache):
        """`logits` of the last position, running only the new token (its memory response, then each layer).
        Eval mode. cache: per decoder layer the normed self-attention inputs of positions 0..t-2; None when
        tokens is just bos."""
        t = tokens.shape[1]
        if (cache is None) != (t == 1):
            raise ValueError(f"decode_step needs a cache exactly when the prefix is longer than bos, got "
                             f"{t} tokens and cache {'None' if cache is None else 'set'}")
        x = self.embed(tokens[:, -1:], start=t - 1)
        x = x + self.cmn(x)
        pad = tokens == self.vocab.pad
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            x, keys = decoder_layer_step(layer, x, None if cache is None else cache[i], memory, pad)
            new_cache.append(keys)
        return self.head(self.decoder.norm(x))[:, -1], tuple(new_cache)
