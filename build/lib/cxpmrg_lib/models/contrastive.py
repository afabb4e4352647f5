"""Stage 2 of MambaXray-VL: X-ray/report contrastive learning (CLIP loss, learnable temperature).

The 4-way image encoder's tokens are mean-pooled (and averaged over a study's images),
the text encoder's pooled output likewise, each projected to a shared space and
L2-normalised; the loss is the symmetric cross-entropy over the batch's similarity
matrix scaled by a learnable temperature (initialised at 0.07, as in CLIP and the paper).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.vision_mamba import VisionMamba, study_tokens

__all__ = ["ContrastiveModel", "clip_loss", "retrieval_recall", "study_features"]


def study_features(encoder: VisionMamba, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled features per study: (B, M, C, S, S) images with a (B, M) mask -> (B, dim), averaged over views."""
    return study_tokens(encoder, images, mask).mean(dim=1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; embeddings must already be L2-normalised."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ContrastiveModel(nn.Module):
    def __init__(self, image_encoder: VisionMamba, text_encoder: nn.Module, proj_dim: int = 256,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_proj = nn.Linear(image_encoder.config.dim, proj_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.output_dim, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_scale._no_weight_decay = True
        self.max_log_scale = math.log(max_logit_scale)

    def embed_images(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.image_proj(study_features(self.image_encoder, images, mask)), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        img = self.embed_images(images, image_mask)
        txt = self.embed_texts(input_ids, attention_mask)
        scale = self.logit_scale.clamp(max=self.max_log_scale)
        return {"loss": clip_loss(img.float(), txt.float(), scale), "temperature": (-scale).exp().detach()}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10),
                     groups: list | None = None) -> dict[str, float]:
    """Image->report and report->image recall@k (percent) for paired, normalised embeddings.

    `groups` (e.g. the report texts) makes a retrieved item count as a hit when it shares the
    query's group: phantom and real datasets hold many word-for-word identical normal reports,
    and retrieving the twin of the right report is not an error.
    """
    sim = image_emb.float() @ text_emb.float().t()
    n = len(sim)
    if groups is None:
        same = torch.eye(n, dtype=torch.bool)
    else:
        ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        codes = torch.tensor([ids[g] for g in groups])
        same = codes[:, None] == codes[None, :]
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.t())):
        order = s.argsort(dim=1, descending=True)
        hits = torch.gather(same, 1, order)               # hits[q, r]: the r-th retrieved item is correct
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * hits[:, : min(k, n)].any(dim=1).float().mean().item()
    return out
