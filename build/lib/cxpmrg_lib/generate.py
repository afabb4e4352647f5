"""Write a report for a study from its image files: `ReportGenerator.from_pretrained(run_dir).generate(paths)`.

Any PNG/JPEG of any size: each view is read as grey, resized to the model's input and
normalised like the training data; a study's views are averaged as in training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["ReportGenerator"]


class ReportGenerator:
    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, run_dir: str | os.PathLike) -> "ReportGenerator":
        from cxpmrg_lib.stages.report import load_report_model

        return cls(load_report_model(run_dir))

    def images_tensor(self, paths: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, M, 1, S, S) views in [-1, 1] and their (1, M) mask; at most the model's max_images."""
        from cxpmrg_lib.data.images import load_image

        if not paths:
            raise ValueError("a study needs at least one image")
        paths = list(paths)[: self.model.max_images]
        size = self.model.image_size
        views = np.stack([load_image(Path(p), size) for p in paths]).astype(np.float32)
        images = torch.from_numpy(views * 2.0 - 1.0)[None, :, None]
        return images, torch.ones(1, len(paths), dtype=torch.bool)

    def generate(self, paths: Sequence[str | os.PathLike], **decoding) -> str:
        """The report for one study; decoding options override the run's (num_beams, ...)."""
        images, mask = self.images_tensor(paths)
        return self.model.generate(images, mask, **{**self.model.decoding, **decoding})[0]
