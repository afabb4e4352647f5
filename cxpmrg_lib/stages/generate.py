"""Write a report for a study from its image files: `ReportGenerator.from_pretrained(folder).generate(paths)`,
where folder is a stage-3 run or its shareable `export/` folder (model card, weights and LM; stages.export).

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
    def from_pretrained(cls, folder: str | os.PathLike, lm_dir: str | os.PathLike | None = None) -> "ReportGenerator":
        """From a stage-3 run folder, or from its shareable export (`<run>/export/`, copied anywhere: it
        needs no run tree; `lm_dir`: where a local pretrained LM that was not copied into it lies)."""
        from cxpmrg_lib.stages.export import is_export, load_exported
        from cxpmrg_lib.stages.report import load_report_model

        if is_export(folder):
            return cls(load_exported(folder, lm_dir=lm_dir))
        return cls(load_report_model(folder))

    @classmethod
    def from_released(cls, stage3: str | os.PathLike, llm_dir: str | os.PathLike,
                      stage2: str | os.PathLike | None = None, **options) -> "ReportGenerator":
        """From the released MambaXray-VL files: a stage-3 checkpoint, the stage-2 one it started from, and a
        local LLM folder (`models.released_report.load_released_report_model`; options go to it)."""
        from cxpmrg_lib.models.released_report import load_released_report_model

        return cls(load_released_report_model(stage3, llm_dir, stage2=stage2, **options))

    def images_tensor(self, paths: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, M, 1, S, S) views in [-1, 1] and their (1, M) mask; at most the model's max_images. A model that
        reads image files its own way (`load_views`: the released one, RGB) reads them."""
        from cxpmrg_lib.data.images import load_image

        if not paths:
            raise ValueError("a study needs at least one image")
        paths = list(paths)[: self.model.max_images]
        if hasattr(self.model, "load_views"):
            return self.model.load_views(paths)
        size = self.model.image_size
        views = np.stack([load_image(Path(p), size) for p in paths]).astype(np.float32)
        images = torch.from_numpy(views * 2.0 - 1.0)[None, :, None]
        return images, torch.ones(1, len(paths), dtype=torch.bool)

    def generate(self, paths: Sequence[str | os.PathLike], **decoding) -> str:
        """The report for one study; decoding options override the run's (num_beams, ...)."""
        images, mask = self.images_tensor(paths)
        return self.model.generate(images, mask, **{**self.model.decoding, **decoding})[0]
