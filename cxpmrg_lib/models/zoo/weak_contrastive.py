"""WCL-style: weakly supervised contrastive learning over report clusters (after Yan et al., "Weakly Supervised
Contrastive Learning for Chest X-Ray Report Generation", Findings of EMNLP 2021).

The mechanism: the training reports are clustered, and studies whose reports fall in the same cluster
count as positives of one another in a contrastive loss on the image side, so that images of similar
reports are pulled together and the others pushed apart, beside the report cross-entropy. Here the
clusters are k-means on the TF-IDF vectors of the training reports (`cluster_reports`, words as the
benchmark's vocabulary splits them), and the loss is the supervised contrastive loss of Khosla et al.
(NeurIPS 2020) on the projected, normalised, pooled encoder output, the cluster ids as its labels.
The original contrasts the image with the report representation and also mines hard negatives;
that part is left out. Cluster ids are training targets only: a model never gets them at test time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer, pooled
from cxpmrg_lib.models.zoo.transformer import TransformerConfig

__all__ = ["cluster_reports", "supervised_contrastive_loss", "WCLStyle"]


def cluster_reports(reports: Sequence[str], clusters: int, seed: int = 0) -> np.ndarray:
    """(N,) cluster id of each report: k-means (k = `clusters`) on the reports' TF-IDF vectors."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not 1 < clusters <= len(reports):
        raise ValueError(f"clusters must be in [2, {len(reports)}] (the reports), got {clusters}")
    vectors = TfidfVectorizer(tokenizer=WordVocab.split, lowercase=False, token_pattern=None).fit_transform(reports)
    return KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(vectors).astype(np.int64)


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Khosla et al.'s loss on (B, d) unit embeddings: for each anchor with at least one other sample of its
    label, the mean over those positives of -log softmax over all other samples of the scaled cosine."""
    n = embeddings.shape[0]
    sims = embeddings.float() @ embeddings.float().T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    log_prob = sims.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return embeddings.new_zeros(())
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / counts[anchors])
    return per_anchor.mean()


class WCLStyle(ConditionedTransformer):
    """The Transformer trained with cross-entropy + `weight` * the supervised contrastive loss of its pooled
    image features over report clusters. `targets`: (B,) long cluster ids of the training reports."""

    needs_targets = True

    def __init__(self, vocab: WordVocab, config: TransformerConfig, max_tokens: int, typical_tokens: int | None,
                 projection_dim: int = 128, temperature: float = 0.1, weight: float = 1.0):
        super().__init__(vocab, config, max_tokens, typical_tokens)
        d = config.d_model
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, projection_dim))
        self.temperature, self.weight = float(temperature), float(weight)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, d) encoded image tokens -> (B, projection_dim) unit embedding the loss compares."""
        return F.normalize(self.projection(pooled(features)), dim=-1)

    def auxiliary_losses(self, aux, targets, logits, hidden, ids):
        if targets is None:
            return {}
        return {"contrastive": self.weight * supervised_contrastive_loss(self.embedding(aux["features"]),
                                                                         targets.view(-1), self.temperature)}
