"""What a training run is asked for (TrainConfig), what it returns (TrainResult), the file names it writes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cxpmrg_lib.runs import METRICS_FILE, TRAIN_SUMMARY_FILE

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
SUMMARY_NAME = TRAIN_SUMMARY_FILE      # the run-folder contract's names (cxpmrg_lib.runs)
METRICS_NAME = METRICS_FILE
_CKPT_RE = re.compile(r"^step_(\d+)$")
_POS_EMBED_RE = re.compile(r"(^|\.|_)(pos_embed|pos_emb|position_embed|absolute_pos)", re.IGNORECASE)
_MIXED_PRECISION = ("auto", "no", "bf16")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; `.result` says where."""

    def __init__(self, message: str, result: "TrainResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class TrainConfig:
    batch_size: int = 16          # GLOBAL batch per optimizer micro-step across processes
    grad_accum: int = 1
    epochs: float = 1.0           # used when max_steps is None
    max_steps: int | None = None  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None   # None -> 5% of total steps (at least 1)
    clip_grad: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 100   # optimizer steps; 0: only the final and signal checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0           # optimizer steps; 0: only at the end (if eval_fn given)
    best_metric: str | None = None  # key of eval_fn's dict, higher is better; kept in run_dir/best/
    mixed_precision: str = "auto"  # "auto" (bf16 on a CUDA device that supports it) | "no" | "bf16"
    num_workers: int = 0
    drop_last: bool = True
    progress: bool = True
    shuffle: bool = True          # seeded permutation per (seed, epoch); False: dataset order
    device: str | None = None     # None: accelerate's device for this process; "cpu" forces the CPU

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and grad_accum ({self.grad_accum}) must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 when max_steps is None, got {self.epochs}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    resumed_from: int | None
    interrupted: bool
    best: dict | None
    history_path: Path
    last_eval: dict | None = None
    images_per_s: float = 0.0
    wall_s: float = 0.0
