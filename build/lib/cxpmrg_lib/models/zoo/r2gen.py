"""R2Gen: the memory-driven Transformer of Chen, Song, Chang and Wan, "Generating Radiology Reports via
Memory-driven Transformer" (EMNLP 2020). The paper feeds ResNet-101 patch features through a
Transformer encoder (3 layers, d 512, 8 heads) to a Transformer decoder in which every layer norm is
a memory-driven conditional layer norm (MCLN): its scale and shift are shifted by MLPs of a relational
memory (RM), a few memory slots updated once per generated token by multi-head attention of the
memory over [memory; previous token embedding], a residual MLP and LSTM-like input and forget gates.
Here the same structure is scaled down: a small ResNet-style CNN (`SmallResNet`) gives 8x8 tokens at
128 px, the views of a study are averaged rather than concatenated, and the default sizes are tiny
(d 192, 3+3 layers, 4 heads, 3 memory slots).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import CaptionModel, SmallResNet, WordVocab, pool_views, sinusoid_positions

__all__ = ["R2GenConfig", "R2Gen", "RelationalMemory", "MemoryConditionalLayerNorm"]


@dataclass
class R2GenConfig:
    d_model: int = 192
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    rm_num_slots: int = 3
    rm_num_heads: int = 4
    rm_d_model: int | None = None          # None: d_model
    image_size: int = 128
    visual_widths: tuple[int, ...] = (32, 64, 128)

    def to_dict(self) -> dict:
        return asdict(self)


class WordEmbedding(nn.Module):
    """Word vectors (unit scale per element) plus sinusoidal positions, then dropout."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float, padding_idx: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.table.weight, std=d_model ** -0.5)
        with torch.no_grad():
            self.table.weight[padding_idx].zero_()
        self.scale = math.sqrt(d_model)
        self.drop = nn.Dropout(dropout)

    def words(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens) * self.scale

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings of `tokens` taken to sit at positions start, start + 1, ... (start > 0: a cached prefix)."""
        x = self.words(tokens)
        positions = sinusoid_positions(start + tokens.shape[1], x.shape[-1], x.device)[start:]
        return self.drop(x + positions)


def transformer_encoder(d_model: int, num_heads: int, d_ff: int, dropout: float, num_layers: int) -> nn.Module:
    """Pre-norm Transformer encoder with a final layer norm, as in the R2Gen family."""
    layer = nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout, activation="relu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


def causal_mask(t: int, device=None) -> torch.Tensor:
    """(t, t) bool, True where a query may not look (the future)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(1)


def attend(attn: nn.MultiheadAttention, query: torch.Tensor, source: torch.Tensor,
           key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`attn(query, source, source, key_padding_mask=...)[0]` (eval mode) for a few queries (B, Lq, d) over a
    long source (B, L, d), without projecting the source: each head's query is taken into input space by
    its W_k (the key bias adds the same to all of a query's scores, so the softmax drops it) and attends
    over the raw inputs, whose weighted mean then goes through W_v (the weights sum to 1: b_v is added once).
    So decoding keeps only the layer inputs of the prefix and never re-projects them, or the image."""
    if attn.training and attn.dropout > 0:
        raise ValueError("attend folds the key and value projections, which attention dropout does not "
                         "allow: call it in eval mode")
    d, h = attn.embed_dim, attn.num_heads
    b, lq, _ = query.shape
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, _, b_v = attn.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(b, lq, h, d // h)
    q = torch.einsum("bqhe,hed->bhqd", q, w_k.view(h, d // h, d)).reshape(b, 1, h * lq, d)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    mixed = F.scaled_dot_product_attention(q, source[:, None], source[:, None], attn_mask=mask,
                                           scale=(d // h) ** -0.5).view(b, h, lq, d)
    out = torch.einsum("bhqd,hed->bqhe", mixed, w_v.view(h, d // h, d)).reshape(b, lq, d) + b_v
    return attn.out_proj(out)


def check_image_size(images: torch.Tensor, image_size: int, name: str) -> None:
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        raise ValueError(f"{name} was configured for {image_size} px images, got {tuple(images.shape[-2:])}")


class RelationalMemory(nn.Module):
    """The RM: `num_slots` memory rows, updated once per token y_t:
    Z = MHA(q=M, k=v=[M; y_t]);  M~ = MLP(M + Z) + M + Z;
    gates G^f, G^i = W y_t + U tanh(M);  M <- sigmoid(G^f) * M + sigmoid(G^i) * tanh(M~).
    Starts from an identity-like memory, so the slots begin distinct."""

    def __init__(self, num_slots: int, d_model: int, num_heads: int, input_dim: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"relational memory width {d_model} is not divisible by {num_heads} heads")
        self.num_slots, self.d_model, self.num_heads = num_slots, d_model, num_heads
        self.input_proj = nn.Linear(input_dim, d_model) if input_dim != d_model else nn.Identity()
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.input_gates = nn.Linear(d_model, 2 * d_model)             # W^f, W^i
        self.memory_gates = nn.Linear(d_model, 2 * d_model)            # U^f, U^i
        self.register_buffer("initial", torch.eye(num_slots, d_model))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """(B, t, input_dim) token embeddings -> (B, t, num_slots, d_model): the memory after each token,
        starting from `memory` (B, num_slots, d_model), the state after earlier tokens, or the initial one."""
        y = self.input_proj(inputs)
        b, t, _ = y.shape
        # everything that depends on the tokens alone is computed for all steps at once
        key_y, value_y = self.key_value(y).chunk(2, dim=-1)
        gates_y = self.input_gates(y)
        if memory is None:
            memory = self.initial.to(y.dtype).expand(b, -1, -1)
        elif memory.shape != (b, self.num_slots, self.d_model):
            raise ValueError(f"relational memory state must be {(b, self.num_slots, self.d_model)}, "
                             f"got {tuple(memory.shape)}")
        states = []
        for i in range(t):
            key_m, value_m = self.key_value(memory).chunk(2, dim=-1)
            keys = torch.cat([key_m, key_y[:, i:i + 1]], dim=1)
            values = torch.cat([value_m, value_y[:, i:i + 1]], dim=1)
            z = F.scaled_dot_product_attention(self._heads(self.query(memory)), self._heads(keys), self._heads(values))
            z = self.out(z.transpose(1, 2).reshape(b, self.num_slots, self.d_model))
            s = memory + z
            candidate = self.mlp(s) + s
            forget, write = (gates_y[:, i:i + 1] + self.memory_gates(torch.tanh(memory))).chunk(2, dim=-1)
            memory = torch.sigmoid(forget) * memory + torch.sigmoid(write) * torch.tanh(candidate)
            states.append(memory)
        return torch.stack(states, dim=1)


class MemoryConditionalLayerNorm(nn.Module):
    """MCLN: layer norm whose scale and shift are gamma + MLP(m_t) and beta + MLP(m_t), m_t the flattened memory."""

    def __init__(self, d_model: int, memory_dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d_model))
        self.beta = nn.Parameter(torch.zeros(d_model))
        self.delta_gamma = nn.Sequential(nn.Linear(memory_dim, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.delta_beta = nn.Sequential(nn.Linear(memory_dim, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (B, t, d), memory (B, t, memory_dim) -> (B, t, d)."""
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed * (self.gamma + self.delta_gamma(memory)) + self.beta + self.delta_beta(memory)


class MemoryDrivenDecoderLayer(nn.Module):
    """Pre-norm decoder layer (masked self-attention, cross-attention, feed-forward) with an MCLN before each."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, memory_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.norms = nn.ModuleList(MemoryConditionalLayerNorm(d_model, memory_dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor,
                pad: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](x, memory)
        x = x + self.drop(self.self_attn(h, h, h, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0])
        h = self.norms[1](x, memory)
        x = x + self.drop(self.cross_attn(h, visual, visual, need_weights=False)[0])
        return x + self.drop(self.ff(self.norms[2](x, memory)))

    def step(self, x: torch.Tensor, memory: torch.Tensor, visual: torch.Tensor, past: torch.Tensor | None,
             pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` (eval mode) for the last position only: x (B, 1, d) and its memory (B, 1, memory_dim);
        `past` the normed self-attention inputs of the earlier positions (B, t-1, d), which the causal mask
        and the per-position MCLN leave unchanged; pad (B, t) the padding of the whole prefix.
        Returns the layer output (B, 1, d) and `past` extended by this position."""
        h = self.norms[0](x, memory)
        keys = h if past is None else torch.cat([past, h], dim=1)
        x = x + self.drop(attend(self.self_attn, h, keys, pad))
        x = x + self.drop(attend(self.cross_attn, self.norms[1](x, memory), visual))
        return x + self.drop(self.ff(self.norms[2](x, memory))), keys


class R2Gen(CaptionModel):
    """Visual extractor -> Transformer encoder -> memory-driven Transformer decoder (see the module docstring).

    `encode` gives the encoded visual tokens (B, 64, d); `logits` recomputes the RM from the token prefix
    (it is a deterministic function of the prefix); `decode_step` carries it, and each decoder layer's
    self-attention inputs, from one generated token to the next.
    """

    def __init__(self, vocab: WordVocab, config: R2GenConfig, max_tokens: int = 100,
                 typical_tokens: int | None = None):
        super().__init__()
        self.vocab, self.config = vocab, config
        self.max_tokens, self.typical_tokens = max_tokens, typical_tokens
        c = config
        rm_d = c.rm_d_model or c.d_model
        self.visual = SmallResNet(dim=c.d_model, widths=c.visual_widths)
        self.att_embed = nn.Sequential(nn.ReLU(), nn.Dropout(c.dropout))
        self.encoder = transformer_encoder(c.d_model, c.num_heads, c.d_ff, c.dropout, c.num_encoder_layers)
        self.embed = WordEmbedding(len(vocab), c.d_model, c.dropout, vocab.pad)
        self.rm = RelationalMemory(c.rm_num_slots, rm_d, c.rm_num_heads, c.d_model)
        memory_dim = c.rm_num_slots * rm_d
        self.layers = nn.ModuleList(MemoryDrivenDecoderLayer(c.d_model, c.num_heads, c.d_ff, c.dropout, memory_dim)
                                    for _ in range(c.num_decoder_layers))
        self.norm = MemoryConditionalLayerNorm(c.d_model, memory_dim)
        self.head = nn.Linear(c.d_model, len(vocab))

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        check_image_size(images, self.config.image_size, "R2Gen")
        return self.encoder(self.att_embed(pool_views(self.visual, images, image_mask)))

    def relational_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, t) tokens -> (B, t, slots, rm_d): the RM after reading each token."""
        return self.rm(self.embed.words(tokens))

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        states = self.relational_memory(tokens).flatten(2)
        x = self.embed(tokens)
        mask, pad = causal_mask(tokens.shape[1], tokens.device), tokens == self.vocab.pad
        for layer in self.layers:
            x = layer(x, states, memory, mask, pad)
        return self.head(self.norm(x, states))

    def decode_step(self, memory: torch.Tensor, tokens: torch.Tensor, cache):
        """`logits` of the last position, reading one more token into the RM and running only the new
        position through the decoder (eval mode). cache: the RM after tokens[:, :-1], then per decoder layer
        the normed self-attention inputs of positions 0..t-2; None when tokens is just bos."""
        t = tokens.shape[1]
        if (cache is None) != (t == 1):
            raise ValueError(f"decode_step needs a cache exactly when the prefix is longer than bos, got "
                             f"{t} tokens and cache {'None' if cache is None else 'set'}")
        last = tokens[:, -1:]
        rm_state = self.rm(self.embed.words(last), None if cache is None else cache[0])[:, 0]   # (B, slots, rm_d)
        state = rm_state.flatten(1)[:, None]                                                      # (B, 1, slots*rm_d)
        x = self.embed(last, start=t - 1)
        pad = tokens == self.vocab.pad
        new_cache = [rm_state]
        for i, layer in enumerate(self.layers):
            x, keys = layer.step(x, state, memory, None if cache is None else cache[1 + i], pad)
            new_cache.append(keys)
        return self.head(self.norm(x, state))[:, -1], tuple(new_cache)
