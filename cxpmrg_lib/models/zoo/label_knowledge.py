"""M2KT-style: multi-label classification with its knowledge transferred into the decoder (after Yang et
al., "Radiology report generation with a learned knowledge base and multi-modal alignment", Medical Image
Analysis 2023; the benchmark's "M2KT").

The mechanism: the image features are classified into the 14 observations, and the predicted label
distribution reaches the report decoder. Here a linear head on the pooled encoder output gives one
logit per observation, trained with binary cross-entropy on the training study's findings (positive
or uncertain, as the backbone step reads them); each observation has a learned knowledge embedding,
scaled by its predicted probability, and these 14 knowledge tokens are appended to the memory the
decoder cross-attends to. The prediction is the model's own, in training as at test: what the decoder
learns to read is what it will be given. Left out: M2KT's learned knowledge base of report texts, its
multi-modal alignment loss and its alternating training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer, pooled
from cxpmrg_lib.models.zoo.transformer import TransformerConfig

__all__ = ["LabelKnowledge", "M2KTStyle"]


class LabelKnowledge(nn.Module):
    """Predicted label probabilities (B, K) -> (B, K, d) knowledge tokens: p_k * e_k, e_k learned."""

    def __init__(self, num_labels: int, dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_labels, dim))

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.unsqueeze(-1) * self.embeddings.to(probabilities.dtype)


class M2KTStyle(ConditionedTransformer):
    """The Transformer whose decoder memory is [encoded image tokens; predicted-label knowledge tokens].
    `targets`: (B, 14) float findings (1 positive or uncertain, else 0)."""

    needs_targets = True

    def __init__(self, vocab: WordVocab, config: TransformerConfig, max_tokens: int, typical_tokens: int | None,
                 num_labels: int = 14, label_weight: float = 1.0):
        super().__init__(vocab, config, max_tokens, typical_tokens)
        self.classifier = nn.Linear(config.d_model, num_labels)
        self.knowledge = LabelKnowledge(num_labels, config.d_model)
        self.label_weight = float(label_weight)

    def state(self, images, image_mask, targets=None):
        features = self.features(images, image_mask)
        label_logits = self.classifier(pooled(features))
        memory = torch.cat([features, self.knowledge(torch.sigmoid(label_logits))], dim=1)
        return (memory, None, None), {"label_logits": label_logits}

    def auxiliary_losses(self, aux, targets, logits, hidden, ids):
        if targets is None:
            return {}
        return {"label_loss": self.label_weight * F.binary_cross_entropy_with_logits(
            aux["label_logits"].float(), targets.float())}
