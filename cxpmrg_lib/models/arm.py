"""Stage 1 of MambaXray-VL: autoregressive pixel prediction over clusters of patches (ARM style).

The patch grid is cut into 4x4-patch clusters, read cluster by cluster (row-major
inside and between clusters). The 1-way encoder sees clusters 1..K-1; since its
scan is causal, a token of cluster k has seen only clusters <= k. A small decoder
of cross-attention blocks, each fed by a different encoder depth, predicts the
pixels of clusters 2..K; its masks are block-causal so the prediction for cluster j
only uses encoder tokens of clusters < j. Loss: MSE on per-patch normalised pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba, match_channels, sincos_pos_embed_2d

__all__ = ["ARMConfig", "ARMPretrainer", "cluster_order", "patchify", "unpatchify", "normalise_patches"]


@dataclass
class ARMConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_dim: int = 128
    decoder_heads: int = 4
    feature_layers: tuple[int, ...] = (2, 4, 6, 8)   # one decoder block per encoder depth
    cluster: int = 4                                 # patches per cluster side
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        self.feature_layers = tuple(int(d) for d in self.feature_layers)
        if self.encoder.scan != "1-way":
            raise ValueError("autoregressive pre-training needs the causal 1-way scan")
        if self.encoder.grid % self.cluster:
            raise ValueError(f"patch grid {self.encoder.grid} is not divisible into {self.cluster}x{self.cluster} "
                             f"clusters (image_size / patch_size must be a multiple of {self.cluster})")
        if self.num_clusters < 2:
            raise ValueError("autoregressive pre-training needs at least 2 clusters")

    @property
    def num_clusters(self) -> int:
        return (self.encoder.grid // self.cluster) ** 2

    @property
    def cluster_len(self) -> int:
        return self.cluster ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()   # leaves out the encoder fields still at their old defaults
        return d


def cluster_order(grid: int, cluster: int = 4) -> torch.Tensor:
    """Row-major patch indices listed cluster by cluster, (grid*grid,)."""
    per_side = grid // cluster
    idx = torch.arange(grid * grid).reshape(per_side, cluster, per_side, cluster)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, (S/p)^2, p*p*C) row-major patches."""
    b, c, s, _ = images.shape
    g = s // patch
    x = images.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g * g, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 1) -> torch.Tensor:
    """Inverse of patchify."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(b, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * patch, g * patch)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (patches - mean) / std, mean, std


class _DecoderBlock(nn.Module):
    """Block-causal self-attention over the queries, cross-attention to one encoder depth, MLP."""

    def __init__(self, dim: int, enc_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(enc_dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(enc_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor,
                cross_mask: torch.Tensor) -> torch.Tensor:
        qq, kk, vv = self.self_qkv(self.norm_self(q)).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(self._heads(qq), self._heads(kk), self._heads(vv), attn_mask=self_mask)
        q = q + self.self_out(self._merge(attn))
        kk, vv = self.cross_kv(self.norm_memory(memory)).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(self._heads(self.cross_q(self.norm_cross(q))), self._heads(kk),
                                              self._heads(vv), attn_mask=cross_mask)
        q = q + self.cross_out(self._merge(attn))
        return q + self.mlp(self.norm_mlp(q))


class ARMPretrainer(nn.Module):
    """Encoder + autoregressive cluster decoder; `forward(images)` returns the loss and the predictions."""

    def __init__(self, cfg: ARMConfig):
        super().__init__()
        self.config = cfg
        enc = cfg.encoder
        bad = [d for d in cfg.feature_layers if not 1 <= d <= enc.depth]
        if bad:
            raise ValueError(f"feature_layers {bad} outside the encoder's 1..{enc.depth}")
        self.encoder = VisionMamba(enc)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(_DecoderBlock(cfg.decoder_dim, enc.dim, cfg.decoder_heads, cfg.mlp_ratio)
                                    for _ in cfg.feature_layers)
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, enc.patch_size ** 2 * enc.in_chans)
        order = cluster_order(enc.grid, cfg.cluster)
        n_ctx = (cfg.num_clusters - 1) * cfg.cluster_len
        self.register_buffer("order", order, persistent=False)
        pos = sincos_pos_embed_2d(cfg.decoder_dim, enc.grid)[order[cfg.cluster_len:]]
        self.register_buffer("query_pos", pos[None], persistent=False)
        enc_cluster = torch.arange(n_ctx) // cfg.cluster_len              # 0-based cluster of each context token
        query_cluster = torch.arange(n_ctx) // cfg.cluster_len + 1         # 0-based cluster each query predicts
        # True = may attend. Query for cluster j reads encoder tokens of clusters < j, and queries of clusters <= j.
        self.register_buffer("cross_mask", enc_cluster[None, :] < query_cluster[:, None], persistent=False)
        self.register_buffer("self_mask", query_cluster[None, :] <= query_cluster[:, None], persistent=False)

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch normalised pixels of clusters 2..K in cluster order, with each patch's mean and std."""
        enc = self.config.encoder
        patches = patchify(match_channels(images, enc.in_chans), enc.patch_size)[:, self.order[self.config.cluster_len:]]
        return normalise_patches(patches.float())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> predicted normalised patches of clusters 2..K, (B, (K-1)*16, p*p*C)."""
        cfg = self.config
        tokens = self.encoder.embed(images)[:, self.order[: -cfg.cluster_len]]
        out = self.encoder.forward_tokens(tokens, return_layers=cfg.feature_layers)
        q = self.mask_token.to(tokens.dtype) + self.query_pos.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for block, memory in zip(self.blocks, out.layers):
            q = block(q, memory, self.self_mask, self.cross_mask)
        return self.pred(self.norm(q))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, dim) of whole images, read in the cluster order the encoder was trained on."""
        tokens = self.encoder.embed(images)[:, self.order]
        return self.encoder.forward_tokens(tokens).pooled

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.predict(images)
        target, _, _ = self.targets(images)
        return {"loss": F.mse_loss(pred.float(), target), "pred": pred}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Input, target clusters and predicted clusters as images (cluster 1, never predicted, left blank).

        Predictions are mapped back to pixels with each true patch's mean and std (as MAE figures do),
        so the picture shows structure, not the brightness the loss ignores.
        """
        cfg, enc = self.config, self.config.encoder
        was_training = self.training
        self.eval()
        pred = self.predict(images).float()
        self.train(was_training)
        target, mean, std = self.targets(images)
        n = enc.num_patches
        blank = torch.full((images.shape[0], n, enc.patch_size ** 2 * enc.in_chans), float("nan"))
        idx = self.order[cfg.cluster_len:]
        target_img, pred_img = blank.clone(), blank.clone()
        target_img[:, idx] = target * std + mean
        pred_img[:, idx] = pred * std + mean
        return {"input": images.float(), "target": unpatchify(target_img, enc.patch_size, enc.in_chans),
                "prediction": unpatchify(pred_img, enc.patch_size, enc.in_chans)}
