"""MambaXray-VL for report generation: the 4-way encoder's tokens as the prefix of a frozen LM.

A study's views each go through the encoder; their token sequences are averaged (the
paper averages the visual features of a study's images) and handed to the
VisualPrefixLM head, which projects them (Linear -> LayerNorm) into the LM's prompt.
"""
from __future__ import annotations

import torch
from torch import nn

from cxpmrg_lib.models.report_lm import VisualPrefixLM
from cxpmrg_lib.models.vision_mamba import VisionMamba, study_tokens

__all__ = ["ReportModel"]


class ReportModel(nn.Module):
    """Encoder + visual-prefix head. `freeze_encoder=True` trains only the projection (an option;
    the paper trains the encoder)."""

    def __init__(self, encoder: VisionMamba, head: VisualPrefixLM, freeze_encoder: bool = False):
        super().__init__()
        self.encoder, self.head, self.freeze_encoder = encoder, head, freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> "ReportModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        self.head.train(mode)
        return self

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor | None, reports: list[str]) -> dict:
        return self.head(study_tokens(self.encoder, images, image_mask), reports)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, image_mask: torch.Tensor | None = None, **decoding) -> list[str]:
        was = self.training
        self.eval()
        try:
            return self.head.generate(study_tokens(self.encoder, images, image_mask), **decoding)
        finally:
            self.train(was)
