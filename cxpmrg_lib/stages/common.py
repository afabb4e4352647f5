"""What every stage shares: the run folder named by a hash of the config, the device, the summary."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["config_hash", "run_dir_for", "resolve_device", "read_summary", "train_settings"]


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


def read_summary(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())



def train_settings(defaults: dict, config, seed: int) -> dict:
    """The preset's TrainConfig defaults with the config's non-None overrides."""
    settings = dict(defaults)
    for key in ("epochs", "max_steps", "batch_size", "lr"):
        value = getattr(config, key)
        if value is not None:
            settings[key] = value
    settings["seed"] = seed
    return settings
