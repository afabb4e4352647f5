"""Stage 1: autoregressive pre-training of the 1-way encoder (models/arm.py), cached by config hash."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cxpmrg_lib.presets import get_preset
from cxpmrg_lib.stages.studies import load_split
from cxpmrg_lib.stages.common import StageConfig, read_summary, require_run, resolve_device, start_run, finish_run

log = logging.getLogger(__name__)

__all__ = ["AutoregressiveConfig", "pretrain_autoregressive", "load_autoregressive", "autoregressive_examples",
           "read_summary"]


@dataclass
class AutoregressiveConfig(StageConfig):
    """Stage 1 (see StageConfig for the shared fields)."""
    max_images: int | None = None        # cap on training images (smoke runs); None: the whole train split
    checkpoint_every: int = 100

    preset_defaults = "stage1"


def _arm_loss(model, batch):
    out = model(batch)
    return out["loss"]


def pretrain_autoregressive(config: AutoregressiveConfig) -> Path:
    """Stage 1: train the 1-way encoder with the autoregressive cluster head; returns the run directory.

    The directory holds config.yaml, metrics.jsonl, checkpoints/, model/ (safetensors +
    config.json) and summary.json (written last: its presence marks a finished run).
    """
    from cxpmrg_lib.models.arm import ARMPretrainer
    from cxpmrg_lib.trainer import TrainConfig, train

    preset = get_preset(config.preset)
    settings = config.train_settings()
    payload = {**config.payload("autoregressive"), "max_images": config.max_images,
               "model": preset.arm.to_dict(), "train": settings}
    run_dir, finished = start_run(config, "autoregressive", payload, "stage 1")
    if finished:
        return run_dir
    torch.manual_seed(config.seed)
    model = ARMPretrainer(preset.arm)
    dataset, _ = load_split(config.dataset_root, preset.encoder.image_size, "train", config.dataset_kind,
                            config.max_images, config.loader, on_bad_image=config.on_bad_image)
    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=resolve_device(config.device),
                               **settings)
    result = train(model, dataset, _arm_loss, train_config, run_dir, model_config=preset.arm.to_dict(),
                   desc="stage 1 (autoregressive)")
    finish_run(run_dir, {"stage": "autoregressive", "config_hash": run_dir.name, "steps": result.steps,
                              "final_loss": result.final_loss, "train_images": len(dataset),
                              "skipped_images": len(getattr(dataset, "bad_images", [])),
                              "preset": config.preset, "dataset": payload["dataset"]})
    return run_dir


def load_autoregressive(run_dir: str | os.PathLike, map_location: str = "cpu"):
    """The trained ARMPretrainer (encoder + head) of a stage-1 run directory."""
    from cxpmrg_lib.models.arm import ARMConfig, ARMPretrainer
    from cxpmrg_lib.trainer import load_weights

    run_dir = require_run(run_dir, "autoregressive")
    weights = run_dir / "model"
    cfg_path = weights / "config.json"
    model = ARMPretrainer(ARMConfig(**json.loads(cfg_path.read_text())))
    return load_weights(model, weights).to(map_location).eval()


def autoregressive_examples(model, dataset_root: str | os.PathLike, kind: str = "auto", loader: dict | None = None,
                            n: int = 4, seed: int = 0, split: str = "test") -> dict:
    """Input / target / predicted-cluster images (numpy) for `n` seeded images of a split."""
    size = model.config.encoder.image_size
    images, _ = load_split(dataset_root, size, split, kind, None, loader)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    batch = torch.stack([images[int(i)] for i in pick])
    return {k: v.cpu().numpy() for k, v in model.reconstruct(batch).items()}

