"""PromptMRG-style: diagnosis-driven prompts (after Jin et al., "PromptMRG: Diagnosis-Driven Prompts for
Medical Report Generation", AAAI 2024).

The mechanism: a classifier over the image features predicts the state of each of the 14 observations,
and its prediction becomes prompt tokens the report decoder reads before it writes. Here:

* the states are the study table's own four: blank (not mentioned, NaN), positive (1), negative (0),
  uncertain (-1), as PromptMRG's [BLA] [POS] [NEG] [UNC];
* the classifier is a linear head on the pooled encoder output, (B, 14, 4) logits, trained with the
  logit-adjusted cross-entropy of Menon et al. (ICLR 2021) against label imbalance: during training
  tau * log(prior of the state) is added to each logit (the prior counted on the training split), and
  the prediction is the argmax of the raw logits, which so lean toward the rare states as much as the
  prior leaned away from them (PromptMRG adds log prior to its positive-class logits the same way);
* one prompt token per observation, a learned embedding per (observation, state), prepended to the
  decoder's input (14 positions before bos);
* training reads the prompt of the training study's own labels (the original's training captions
  carry the ground-truth prompt); at test time the prompt comes only from the classifier, since a model
  never gets `targets` then.

Left out: PromptMRG's retrieval of CLIP text features into the classifier's input, its BERT decoder
and its 18 classes (14 observations + 4 extra).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import WordVocab
from cxpmrg_lib.models.zoo.conditioned import ConditionedTransformer, pooled
from cxpmrg_lib.models.zoo.transformer import TransformerConfig

__all__ = ["STATES", "label_states", "state_log_prior", "LogitAdjustedClassifier", "PromptMRGStyle"]

STATES = ("blank", "positive", "negative", "uncertain")
_VALUE_OF_STATE = (np.nan, 1.0, 0.0, -1.0)


def label_states(labels) -> torch.Tensor:
    """(N, K) study-table label values (1, 0, -1, NaN) -> (N, K) long state indices into STATES."""
    values = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    states = torch.zeros(values.shape, dtype=torch.long)           # NaN: blank
    for index, value in enumerate(_VALUE_OF_STATE[1:], start=1):
        states[values == value] = index
    unknown = ~torch.isnan(values) & ~torch.isin(values, torch.tensor(_VALUE_OF_STATE[1:]))
    if bool(unknown.any()):
        raise ValueError(f"label values must be 1, 0, -1 or NaN; got {sorted(set(values[unknown].tolist()))}")
    return states


def state_log_prior(states: torch.Tensor, num_states: int = len(STATES), smoothing: float = 1.0) -> torch.Tensor:
    """(K, S) log frequency of each state per observation, counted on `states` (N, K) with add-`smoothing`."""
    counts = F.one_hot(states, num_states).sum(0).float() + smoothing
    return (counts / counts.sum(-1, keepdim=True)).log()


class LogitAdjustedClassifier(nn.Module):
    """A linear head giving (B, K, S) logits, trained with the logit-adjusted loss: cross-entropy on
    logits + tau * log_prior. `predict` takes the argmax of the raw logits."""

    def __init__(self, dim: int, log_prior: torch.Tensor, tau: float = 1.0):
        super().__init__()
        if log_prior.ndim != 2:
            raise ValueError(f"log_prior must be (observations, states), got {tuple(log_prior.shape)}")
        self.num_labels, self.num_states = log_prior.shape
        self.head = nn.Linear(dim, self.num_labels * self.num_states)
        self.register_buffer("log_prior", log_prior.float().clone())
        self.tau = float(tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).view(-1, self.num_labels, self.num_states)

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the training loss reads: raw + tau * log prior (rare states pushed down)."""
        return logits + self.tau * self.log_prior.to(logits.dtype)

    def loss(self, logits: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.adjusted(logits).reshape(-1, self.num_states).float(), states.reshape(-1))

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class PromptMRGStyle(ConditionedTransformer):
    """The Transformer with a logit-adjusted observation classifier whose predicted states become 14
    prompt tokens before bos (see the module docstring). `targets`: (B, 14) state indices."""

    needs_targets = True

    def __init__(self, vocab: WordVocab, config: TransformerConfig, max_tokens: int, typical_tokens: int | None,
                 log_prior: torch.Tensor, tau: float = 1.0, label_weight: float = 1.0):
        super().__init__(vocab, config, max_tokens, typical_tokens)
        d = config.d_model
        self.classifier = LogitAdjustedClassifier(d, log_prior, tau)
        # unit scale per element, as the word inputs (embedding * sqrt(d))
        self.prompt_table = nn.Parameter(torch.randn(self.classifier.num_labels, self.classifier.num_states, d))
        self.label_weight = float(label_weight)

    def prompt(self, states: torch.Tensor) -> torch.Tensor:
        """(B, 14) state indices -> (B, 14, d) prompt tokens, one per observation."""
        rows = torch.arange(self.classifier.num_labels, device=states.device)
        return self.prompt_table[rows, states]

    def state(self, images, image_mask, targets=None):
        features = self.features(images, image_mask)
        label_logits = self.classifier(pooled(features))
        states = targets if targets is not None else self.classifier.predict(label_logits)
        return (features, self.prompt(states), None), {"label_logits": label_logits}

    def auxiliary_losses(self, aux, targets, logits, hidden, ids):
        if targets is None:
            return {}
        return {"label_loss": self.label_weight * self.classifier.loss(aux["label_logits"], targets)}
