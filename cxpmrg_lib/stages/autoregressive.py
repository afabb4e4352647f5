"""Stage 1: autoregressive pre-training of the 1-way encoder (models/arm.py), cached by config hash."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from cxpmrg_lib.fileio import write_json, write_text
from cxpmrg_lib.presets import get_preset
from cxpmrg_lib.stage_data import DEFAULT_LOADER, load_split
from cxpmrg_lib.stages.common import read_summary, resolve_device, run_dir_for, train_settings

log = logging.getLogger(__name__)

__all__ = ["AutoregressiveConfig", "pretrain_autoregressive", "load_autoregressive", "autoregressive_examples",
           "read_summary"]


@dataclass
class AutoregressiveConfig:
    """Stage 1. Training fields left as None take the preset's defaults (presets.py)."""
    dataset_root: str
    dataset_kind: str = "auto"
    preset: str = "tiny"
    run_root: str = "runs"
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    max_images: int | None = None        # cap on training images (smoke runs); None: the whole train split
    loader: dict = field(default_factory=lambda: dict(DEFAULT_LOADER))  # load_study_table options
    checkpoint_every: int = 100
    device: str = "auto"                 # not part of the hash: the result does not depend on it beyond float noise

    def train_settings(self) -> dict:
        return train_settings(get_preset(self.preset).stage1, self, self.seed)


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
    payload = {"stage": "autoregressive", "dataset": str(Path(config.dataset_root).resolve()),
               "dataset_kind": config.dataset_kind, "loader": config.loader, "max_images": config.max_images,
               "model": preset.arm.to_dict(), "train": settings}
    run_dir = run_dir_for(config.run_root, config.dataset_root, config.preset, "autoregressive", payload)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        log.info("stage 1: reusing finished run %s", run_dir)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump({"config": asdict(config), "resolved": payload},
                                                       sort_keys=False))
    torch.manual_seed(config.seed)
    model = ARMPretrainer(preset.arm)
    dataset, _ = load_split(config.dataset_root, preset.encoder.image_size, "train", config.dataset_kind,
                            config.max_images, config.loader)
    device = resolve_device(config.device)
    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available")
    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=device, **settings)
    result = train(model, dataset, _arm_loss, train_config, run_dir, model_config=preset.arm.to_dict(),
                   desc="stage 1 (autoregressive)")
    write_json(summary_path, {"stage": "autoregressive", "config_hash": run_dir.name, "steps": result.steps,
                              "final_loss": result.final_loss, "train_images": len(dataset),
                              "preset": config.preset, "dataset": payload["dataset"]})
    return run_dir


def load_autoregressive(run_dir: str | os.PathLike, map_location: str = "cpu"):
    """The trained ARMPretrainer (encoder + head) of a stage-1 run directory."""
    from cxpmrg_lib.models.arm import ARMConfig, ARMPretrainer
    from cxpmrg_lib.trainer import load_weights

    run_dir = Path(run_dir)
    weights = run_dir / "model"
    cfg_path = weights / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} holds no finished stage-1 model ({cfg_path} missing)")
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

