"""The training stages of MambaXray-VL, each a function of a config that returns its run directory.

A stage's run directory is `<run_root>/<dataset>/<preset>/<stage>/<config hash>/`. A
finished run (its `summary.json` exists) is reused as is; an interrupted one resumes
from its last checkpoint (the trainer does that); nothing is re-run for the same config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cxpmrg_lib.fileio import write_json, write_text
from cxpmrg_lib.presets import get_preset

log = logging.getLogger(__name__)

__all__ = ["AutoregressiveConfig", "pretrain_autoregressive", "load_autoregressive", "run_dir_for",
           "config_hash", "ImageTensorDataset", "load_split", "read_summary", "autoregressive_examples", "resolve_device"]

# In-memory image caches above this size stream from disk instead.
MAX_CACHED_BYTES = 2 * 1024 ** 3
# CheXpert Plus ships train/valid only; the study uses a 70/10/20 patient split (R2Gen trees keep theirs).
DEFAULT_LOADER = {"split": "patient"}


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
        settings = dict(get_preset(self.preset).stage1)
        for key in ("epochs", "max_steps", "batch_size", "lr"):
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        settings["seed"] = self.seed
        return settings


def config_hash(payload: dict) -> str:
    """Twelve hex digits of the sha256 of the canonical JSON of what determines a run's result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir_for(run_root: str | os.PathLike, dataset_root: str | os.PathLike, preset: str, stage: str,
                payload: dict) -> Path:
    dataset = Path(dataset_root).resolve().name or "dataset"
    return Path(run_root) / dataset / preset / stage / config_hash(payload)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 (N, 1, S, S); items are float tensors in [-1, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float().div_(127.5).sub_(1.0)


class _StreamedImages(Dataset):
    """The first image of each study, read from disk per item (datasets too big for memory)."""

    def __init__(self, studies):
        self.studies = studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.studies[i]["image"][0]


def load_split(dataset_root: str | os.PathLike, image_size: int, split: str = "train", kind: str = "auto",
               limit: int | None = None, loader: dict | None = None, num_workers: int = 2):
    """(images, table) of one split: every study's first (frontal) image as a Dataset of (1, S, S)
    tensors in [-1, 1], and the study table rows in the same order.

    Small datasets are decoded once into memory (uint8), since re-decoding PNGs every epoch
    would cost more than the training on a CPU.
    """
    from cxpmrg_lib.data import load_study_table
    from cxpmrg_lib.data.dataset import StudyDataset, collate_studies

    table = load_study_table(dataset_root, kind=kind, **(DEFAULT_LOADER if loader is None else loader))
    table = table[table["split"] == split].reset_index(drop=True)
    if limit is not None:
        table = table.iloc[: int(limit)]
    if table.empty:
        raise ValueError(f"{dataset_root} has no studies in split {split!r}")
    studies = StudyDataset(table, dataset_root, image_size=image_size, max_images=1)
    if len(table) * image_size ** 2 > MAX_CACHED_BYTES:
        log.info("streaming %d %s images from disk (too many to hold in memory)", len(table), split)
        return _StreamedImages(studies), table
    images = torch.empty(len(table), 1, image_size, image_size, dtype=torch.uint8)
    dl = torch.utils.data.DataLoader(studies, batch_size=64, num_workers=num_workers, collate_fn=collate_studies)
    done = 0
    for batch in tqdm(dl, desc=f"decode {split} images", unit="batch", leave=False):
        x = batch["image"][:, 0]
        images[done: done + len(x)] = ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        done += len(x)
    return ImageTensorDataset(images), table


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


def read_summary(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())



def autoregressive_examples(model, dataset_root: str | os.PathLike, kind: str = "auto", loader: dict | None = None,
                            n: int = 4, seed: int = 0, split: str = "test") -> dict:
    """Input / target / predicted-cluster images (numpy) for `n` seeded images of a split."""
    size = model.config.encoder.image_size
    images, _ = load_split(dataset_root, size, split, kind, None, loader)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    batch = torch.stack([images[int(i)] for i in pick])
    return {k: v.cpu().numpy() for k, v in model.reconstruct(batch).items()}
