"""XProNet-style: cross-modal prototypes (after Wang, Bhalerao and He, "Cross-modal Prototype Driven Network
for Radiology Report Generation", ECCV 2022).

The mechanism: one learned prototype matrix shared by image and text, organised in groups by
observation, is queried by the visual features before the encoder and by the decoder's word inputs
(the text states), and each query's response is added to what queried it. Here 14 groups of
`per_group` prototypes; a query attends over all of them, each group's scores shifted by the log of
the predicted probability of its observation, so that the prototypes of the findings the image shows
answer most. Both queries use the same matrix and the same projections.

Which prototypes to read: the original picks them with labels of the study, and its released code
takes those labels, at test time too, from the CheXbert labels of the reference reports, i.e. from
the answer. Here no label derived from the reference reports reaches the model at test time: the
group weights come from the model's own classifier on the image features (a linear head on the pooled
visual features, trained with binary cross-entropy on the training split's findings), in training as
at test. Left out: the original's prototype initialisation from clustered training features and its
cross-modal prototype (multi-label contrastive) loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import WordVocab, pool_views
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer, pooled
from cxpmrg_lib.models.zoo.transformer import TransformerConfig

__all__ = ["SharedPrototypes", "XProNetStyle"]


class SharedPrototypes(nn.Module):
    """A (groups * per_group, d) prototype matrix read by attention; `forward(x, group_probs)` gives the
    response (B, L, d) of queries x (B, L, d) with each group's scores shifted by log p(group)."""

    def __init__(self, groups: int, per_group: int, dim: int, min_prob: float = 1e-4):
        super().__init__()
        self.groups, self.per_group, self.min_prob = groups, per_group, float(min_prob)
        self.prototypes = nn.Parameter(torch.randn(groups * per_group, dim) * dim ** -0.5)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, group_probs: torch.Tensor) -> torch.Tensor:
        if group_probs.shape[-1] != self.groups:
            raise ValueError(f"group_probs must have {self.groups} columns, got {tuple(group_probs.shape)}")
        scores = self.query(x) @ self.key(self.prototypes).T / math.sqrt(x.shape[-1])     # (B, L, G*P)
        bias = group_probs.clamp_min(self.min_prob).log().repeat_interleave(self.per_group, dim=-1)
        weights = torch.softmax(scores + bias[:, None, :].to(scores.dtype), dim=-1)
        return self.out(weights @ self.value(self.prototypes))


class XProNetStyle(ConditionedTransformer):
    """The Transformer with one prototype matrix added to its visual features (before the encoder) and to
    its word inputs. `targets`: (B, 14) float findings for the classifier that weights the groups."""

    needs_targets = True

    def __init__(self, vocab: WordVocab, config: TransformerConfig, max_tokens: int, typical_tokens: int | None,
                 num_labels: int = 14, per_group: int = 8, label_weight: float = 1.0):
        super().__init__(vocab, config, max_tokens, typical_tokens)
        self.classifier = nn.Linear(config.d_model, num_labels)
        self.prototypes = SharedPrototypes(num_labels, per_group, config.d_model)
        self.label_weight = float(label_weight)

    def state(self, images, image_mask, targets=None):
        visual = pool_views(self.visual, images, image_mask)
        label_logits = self.classifier(pooled(visual))
        probs = torch.sigmoid(label_logits)
        memory = self.encoder(visual + self.prototypes(visual, probs))
        return (memory, None, probs), {"label_logits": label_logits}

    def embed_words(self, tokens, state, start=0):
        x = super().embed_words(tokens, state, start)
        return x + self.prototypes(x, state[2])

    def auxiliary_losses(self, aux, targets, logits, hidden, ids):
        if targets is None:
            return {}
        return {"label_loss": self.label_weight * F.binary_cross_entropy_with_logits(
            aux["label_logits"].float(), targets.float())}
