"""One training loop for every stage and baseline.

Of HF accelerate it uses only the process state (`PartialState`: rank, world size, device, the
process group that `accelerate launch` or torchrun sets up) and its helpers to broadcast and gather
Python objects and move batches to the device; it does not use `Accelerator.prepare` or a DDP
wrapper, and averages the gradients itself (see below).

AdamW with linear warm-up then cosine decay, gradient clipping and accumulation, bf16
autocast on GPUs, metrics.jsonl, safetensors checkpoints and automatic resume.

Two choices make a resumed run, and a run on P processes, end with the weights of one
uninterrupted 1-process run:
- the data order is a pure function of (seed, epoch, position): global batch i of an
  epoch is slice i of a seeded permutation, and rank r takes part r of it. A resumed run
  starts at its position without reading the batches it skips.
- gradients are averaged across processes by one explicit all-reduce per optimizer
  step, not by a DDP wrapper: `loss_fn` gets the plain model and may call any of its
  methods (DDP only synchronises gradients when its own forward() runs, and skips
  silently otherwise).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
from safetensors.torch import load_model, save_model
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.util.fileio import atomic_dir, atomic_path, write_json, write_text

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "load_weights", "save_weights",
           "read_metrics", "latest_checkpoint", "optimizer_param_groups", "build_optimizer", "adamw", "lr_factor",
           "total_steps_for"]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
SUMMARY_NAME = "train_summary.json"
METRICS_NAME = "metrics.jsonl"
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


# ----------------------------------------------------------------------------- weights

def save_weights(model: torch.nn.Module, directory: str | os.PathLike, model_config: dict | None = None) -> Path:
    """Write model.safetensors (and config.json) into `directory`, each file atomically.

    config.json goes first, so a present model.safetensors always has its config beside it.
    Tied (shared) tensors are stored once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_config is not None:
        write_json(directory / CONFIG_NAME, model_config)
    target = directory / WEIGHTS_NAME
    with atomic_path(target) as tmp:
        save_model(_unwrap(model), str(tmp), metadata={"format": "pt"})
    return target


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> torch.nn.Module:
    """Load model.safetensors (a directory holding it, or the file) into `model`; returns `model`."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no weights at {file}")
    try:
        missing, unexpected = load_model(_unwrap(model), str(file), strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f"weights {file} do not fit {type(model).__name__}: {e}") from e
    if missing or unexpected:
        log.warning("loaded %s non-strictly: %d missing keys %s, %d unexpected keys %s", file, len(missing),
                    sorted(missing)[:5], len(unexpected), sorted(unexpected)[:5])
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- run directory

def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of metrics.jsonl (`run_dir` or the file itself); a truncated last line is skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.debug("skipping a malformed line of %s: %.80s", path, line)
    return rows


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under run_dir/checkpoints, or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- optimisation

def _no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (p.ndim <= 1 or leaf.endswith("A_log") or leaf == "D" or bool(_POS_EMBED_RE.search(name))
            or getattr(p, "_no_weight_decay", False))


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in AdamW groups: with and without weight decay, and by learning-rate scale.

    No decay for 1-D tensors (norms, biases), SSM `A_log` and `D`, position embeddings and
    any parameter flagged `_no_weight_decay = True`. A parameter flagged `_lr_scale = s`
    trains at s times the peak learning rate (same schedule); its group carries "lr_scale".
    Each group also lists its "names".
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _no_weight_decay(name, p)
        scale = float(getattr(p, "_lr_scale", 1.0))
        group = groups.setdefault((no_decay, scale), {"params": [], "names": [],
                                                      "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": scale})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1] != 1.0, k[0], k[1]))]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused (one kernel over all parameters) where torch has the fused kernel for
    every parameter's device and dtype (CPU and CUDA floats): on a CPU the default per-parameter loop
    costs about 3.4x the fused step (300 tensors of 16k values, 1 thread), and a Vision Mamba has
    many small tensors (each direction's conv, projections, A and D). Same update rule."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = optimizer_param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    return adamw([{**{k: v for k, v in g.items() if k not in ("names", "lr_scale")},
                   "lr": config.lr * g["lr_scale"]} for g in groups],
                 lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr used by optimizer step `step + 1` (`step` steps done).

    Linear warm-up (1/W, 2/W, ... 1) over W steps, then a cosine from 1 down to
    min_lr_ratio, reached after the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps_for(config: TrainConfig, n_samples: int) -> int:
    """Optimizer steps of a run: max_steps, else ceil(epochs * n / (batch_size * grad_accum))."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_samples / (config.batch_size * config.grad_accum)))


def _warmup_for(config: TrainConfig, total: int) -> int:
    return config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))


# ----------------------------------------------------------------------------- data

class _GlobalBatchSampler:
    """Per-rank index lists of global batches; the order depends only on (seed, epoch).

    Global batch i of an epoch is positions [i*B, (i+1)*B) of the epoch's permutation and
    rank r takes the r-th of P equal parts. A short last batch (drop_last=False) is padded
    from the start of the permutation to a multiple of P so that every rank gets a share.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool,
                 drop_last: bool):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.skip = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for i in range(self.skip, self.batches_per_epoch):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            short = -len(batch) % self.world
            if short:
                batch = torch.cat([batch, order.repeat(math.ceil(short / self.n))[:short]])
            part = len(batch) // self.world
            yield batch[self.rank * part:(self.rank + 1) * part].tolist()


def _worker_init(worker_id: int) -> None:
    # Workers are the parallelism; torch threads inside them would only compete.
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def _default_batch_size(batch: Any) -> int:
    """First dimension of the first tensor in the batch (dicts, lists, tuples searched in order)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)):
            n = _default_batch_size(v)
            if n:
                return n
    return len(batch) if isinstance(batch, (list, tuple)) else 0


# ----------------------------------------------------------------------------- distributed helpers

class _Dist:
    """The few collective operations the loop needs; no-ops on one process."""

    def __init__(self, device: torch.device):
        state = PartialState()
        self.rank, self.world, self.main = state.process_index, state.num_processes, state.is_main_process
        self.device = device
        self._state = state

    def barrier(self) -> None:
        if self.world > 1:
            self._state.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        return broadcast_object_list([obj])[0] if self.world > 1 else obj

    def gather(self, obj) -> list:
        return gather_object([obj]) if self.world > 1 else [obj]

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers."""
        if self.world > 1:
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of the gradients over ranks; a parameter with no gradient on any rank keeps none."""
        if self.world == 1:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in live:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            for bucket in _buckets(grads, 32 * 2 ** 20):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat /= self.world
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> Iterator[list[torch.Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= max_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _signal_flag() -> Iterator[dict]:
    """While active, SIGINT/SIGTERM set flag["signal"] (a second one stops at once)."""
    flag: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        log.debug("train() is not on the main thread: no SIGINT/SIGTERM handlers")
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise TrainingInterrupted(f"second {signal.Signals(signum).name}: stopped without a new checkpoint")
        flag["signal"] = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving a checkpoint", flag["signal"])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the loop

def _split_loss(out) -> tuple[torch.Tensor, dict]:
    loss, extras = (out if isinstance(out, tuple) else (out, {}))
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor (or (loss, dict)); got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
    return loss.reshape(()), dict(extras)


def _resolve_precision(config: TrainConfig, device: torch.device) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


class _Window:
    """Sums since the last log line (kept as tensors: no device sync per step)."""

    def __init__(self):
        self.loss = None
        self.micro = 0
        self.images = 0
        self.extras: dict[str, list] = {}
        self.grad_norm = None
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, extras: dict) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss
        self.micro += 1
        self.images += images
        for k, v in extras.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            s = self.extras.setdefault(k, [0.0, 0])
            s[0] = s[0] + v
            s[1] += 1

    def summary(self) -> dict:
        return {"loss": float(self.loss) if self.loss is not None else 0.0, "micro": self.micro,
                "images": self.images, "extras": {k: (float(s), n) for k, (s, n) in self.extras.items()},
                "grad_norm": float(self.grad_norm) / self.steps if self.steps and self.grad_norm is not None
                else None}


class _Run:
    def __init__(self, model, dataset, loss_fn, config: TrainConfig, run_dir: Path, collate_fn, model_config,
                 eval_fn, batch_size_of, desc):
        self.model, self.dataset, self.loss_fn, self.config = model, dataset, loss_fn, config
        self.collate_fn = collate_fn
        self.run_dir, self.model_config, self.eval_fn, self.desc = run_dir, model_config, eval_fn, desc
        self.batch_size_of = batch_size_of or _default_batch_size
        self.t0 = time.perf_counter()
        state = PartialState()
        self.device = torch.device(config.device) if config.device else state.device
        self.dist = _Dist(self.device)
        if config.batch_size % self.dist.world:
            raise ValueError(f"batch_size {config.batch_size} (global) is not divisible by the "
                             f"{self.dist.world} processes")
        self.precision = _resolve_precision(config, self.device)
        self.n = len(dataset)
        self.total = total_steps_for(config, self.n)
        self.warmup = _warmup_for(config, self.total)
        self.sampler = _GlobalBatchSampler(self.n, config.batch_size, self.dist.rank, self.dist.world, config.seed,
                                           config.shuffle, config.drop_last)
        if self.sampler.batches_per_epoch == 0:
            raise ValueError(f"a dataset of {self.n} samples holds no full batch of {config.batch_size} "
                             f"(drop_last=True): lower batch_size or set drop_last=False")
        self.step = self.micro = 0
        self.elapsed_before = 0.0
        self.resumed_from: int | None = None
        self.best: dict | None = None
        self.last_eval: dict | None = None
        self.final_loss = float("nan")
        self.lr = config.lr
        self.session_images = 0

    # -- paths
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- set-up
    def setup(self) -> None:
        cfg = self.config
        set_seed(cfg.seed + self.dist.rank)  # distinct dropout streams per process
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg)
        total, warmup, floor = self.total, self.warmup, cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, floor))
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_root.glob(".tmp_step_*") if self.ckpt_root.is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)
        self.dist.barrier()
        ckpt = self.dist.broadcast_object(str(latest_checkpoint(self.run_dir) or ""))
        if ckpt:
            self._resume(Path(ckpt))
        if self.dist.main:
            self._truncate_metrics(self.step)
            self.best = self._read_best()
        self.best = self.dist.broadcast_object(self.best)
        self.dist.broadcast_model(self.model)
        pin = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn, num_workers=cfg.num_workers,
            pin_memory=pin, worker_init_fn=_worker_init if cfg.num_workers else None,
            persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
        if self.dist.main:
            log.info("%s: %d steps (%d done), global batch %d x %d accumulation on %d process(es), %s, "
                     "mixed precision %s, %d trainable parameters", self.desc, self.total, self.step, cfg.batch_size,
                     cfg.grad_accum, self.dist.world, self.device, self.precision,
                     sum(p.numel() for p in self.params))

    def _resume(self, ckpt: Path) -> None:
        state = json.loads((ckpt / STATE_NAME).read_text())
        if int(state["step"]) > self.total:
            raise ValueError(f"{ckpt} is past the {self.total} steps of this config: use a new run_dir "
                             f"(or max_steps >= {state['step']})")
        load_weights(self.model, ckpt)
        try:
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))
        except (ValueError, KeyError) as e:
            raise ValueError(f"optimizer state of {ckpt} does not fit this model's trainable parameters ({e}); "
                             f"remove the checkpoint or use another run_dir") from e
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng_file = ckpt / f"rng_state_{self.dist.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s has no RNG state for rank %d: random streams restart from the seed", ckpt,
                        self.dist.rank)
        self.step = int(state["step"])
        same_batches = (state.get("batch_size"), state.get("grad_accum")) == (self.config.batch_size,
                                                                               self.config.grad_accum)
        if not same_batches:
            log.warning("%s was written with batch_size %s x grad_accum %s, now %d x %d: the data position "
                        "is approximate", ckpt, state.get("batch_size"), state.get("grad_accum"),
                        self.config.batch_size, self.config.grad_accum)
        self.micro = int(state["micro_step"]) if same_batches else self.step * self.config.grad_accum
        if state.get("total_steps") != self.total:
            log.warning("%s belongs to a run of %s steps, now %d: the lr schedule follows the new length",
                        ckpt, state.get("total_steps"), self.total)
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.final_loss = float(state.get("loss", float("nan")))
        self.resumed_from = self.step
        if self.dist.main:
            log.info("%s: resuming from %s (step %d of %d)", self.desc, ckpt, self.step, self.total)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of a killed run written after the checkpoint we resume from."""
        if not self.metrics_path.exists():
            return
        rows = [r for r in read_metrics(self.metrics_path) if int(r.get("step", 0)) <= step]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def _read_best(self) -> dict | None:
        path = self.run_dir / "best" / "best.json"
        if self.config.best_metric and path.exists():
            best = json.loads(path.read_text())
            if best.get("metric") == self.config.best_metric:
                return best
        return None

    # -- the loop
    def _train_mode(self) -> None:
        """model.train(), except frozen submodules the caller had put in eval mode (e.g. a frozen LM)."""
        self.model.train()
        for m, was_training in self.entry_modes.items():
            params = list(m.parameters())
            if not was_training and params and not any(p.requires_grad for p in params):
                m.eval()

    def run(self) -> TrainResult:
        cfg = self.config
        self.entry_modes = {m: m.training for m in self.model.modules()}
        self._train_mode()
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.main))
        window = _Window()
        session_start = time.perf_counter()
        try:
            with _signal_flag() as flag:
                while self.step < self.total:
                    epoch, skip = divmod(self.micro, self.sampler.batches_per_epoch)
                    self.sampler.set_position(epoch, skip)
                    for batch in self.loader:
                        self._micro_step(batch, window)
                        if self.micro % cfg.grad_accum:
                            continue
                        window.grad_norm = self._optimizer_step(window.grad_norm)
                        window.steps += 1
                        bar.update(1)
                        stop = self.dist.any(flag["signal"] is not None)
                        if self._due(cfg.log_every) or stop:
                            window = self._log(window, bar)
                        if self.eval_fn is not None and self._eval_due():
                            self._evaluate()
                            window.start = time.perf_counter()
                        if stop:
                            self._save_checkpoint()
                            result = self._finish(session_start, interrupted=True)
                            raise TrainingInterrupted(
                                f"{self.desc}: stopped by {flag['signal'] or 'a signal'} at step {self.step} "
                                f"of {self.total}; checkpoint saved, rerun to resume", result)
                        if self.step < self.total and cfg.checkpoint_every and self._due(cfg.checkpoint_every):
                            self._save_checkpoint()
                            window.start = time.perf_counter()
                        if self.step >= self.total:
                            break
                if window.steps:
                    window = self._log(window, bar)
                self.dist.broadcast_model(self.model)
                self._save_checkpoint()
                self._save_final()
                return self._finish(session_start, interrupted=False)
        finally:
            bar.close()
            for m, was_training in self.entry_modes.items():
                m.train(was_training)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _micro_step(self, batch, window: _Window) -> None:
        batch = send_to_device(batch, self.device, non_blocking=True)
        with self.autocast():
            loss, extras = _split_loss(self.loss_fn(self.model, batch))
        (loss / self.config.grad_accum).backward()
        images = int(self.batch_size_of(batch))
        window.add(loss, images, extras)
        self.session_images += images
        self.micro += 1

    def _optimizer_step(self, grad_norm_sum):
        self.dist.average_gradients(self.params)
        norm = None
        if self.config.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad).detach().float()
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if norm is None:
            return grad_norm_sum
        return norm if grad_norm_sum is None else grad_norm_sum + norm

    def _log(self, window: _Window, bar) -> _Window:
        seconds = max(time.perf_counter() - window.start, 1e-9)
        parts = self.dist.gather(window.summary())
        if self.dist.main:
            micro = sum(p["micro"] for p in parts)
            loss = sum(p["loss"] for p in parts) / max(micro, 1)
            images = sum(p["images"] for p in parts)
            row = {"step": self.step, "epoch": round(self.micro / self.sampler.batches_per_epoch, 4),
                   "loss": loss, "lr": self.lr, "images_per_s": images / seconds,
                   "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.t0, 3)}
            if parts[0]["grad_norm"] is not None:
                row["grad_norm"] = parts[0]["grad_norm"]
            keys = sorted({k for p in parts for k in p["extras"]})
            for k in keys:
                s = sum(p["extras"][k][0] for p in parts if k in p["extras"])
                n = sum(p["extras"][k][1] for p in parts if k in p["extras"])
                row.setdefault(k, s / max(n, 1))
            self._append_metrics(row)
            bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{row['images_per_s']:.1f}")
            if not bar.disable:
                log.debug("%s", row)
            else:
                log.info("%s step %d/%d loss %.4g lr %.3g %.1f img/s", self.desc, self.step, self.total, loss,
                         self.lr, row["images_per_s"])
            self.final_loss = loss
        self.final_loss = self.dist.broadcast_object(self.final_loss)
        if not math.isfinite(self.final_loss):
            ckpt = latest_checkpoint(self.run_dir)
            raise FloatingPointError(f"{self.desc}: training loss is {self.final_loss} at step {self.step}; "
                                     f"last good checkpoint: {ckpt}")
        return _Window()

    def _append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _eval_due(self) -> bool:
        """Every `eval_every` steps and at the end; a periodic evaluation less than half an interval
        before the end is left to the final one (3 epochs of 64.9 batches: steps 64, 128 and 195,
        not 192 and 195 as well)."""
        if self.step == self.total:
            return True
        every = self.config.eval_every
        return bool(every) and self._due(every) and self.total - self.step >= every / 2

    def _evaluate(self) -> None:
        """eval_fn on the main process (the others wait); keeps the best weights if asked."""
        if self.dist.main:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                result = {k: float(v) for k, v in self.eval_fn(self.model).items()}
            self._train_mode()
            self.last_eval = result
            self._append_metrics({"step": self.step, "eval": result})
            metric = self.config.best_metric
            if metric:
                if metric not in result:
                    raise KeyError(f"best_metric {metric!r} is not among eval_fn's keys {sorted(result)}")
                if self.best is None or result[metric] > self.best["value"]:
                    self.best = {"metric": metric, "value": result[metric], "step": self.step,
                                 "path": str(self.run_dir / "best")}
                    with atomic_dir(self.run_dir / "best", overwrite=True) as tmp:
                        save_weights(self.model, tmp, self.model_config)
                        write_json(tmp / "best.json", self.best)
                    log.info("%s: new best %s = %.4g at step %d", self.desc, metric, result[metric], self.step)
        self.last_eval = self.dist.broadcast_object(self.last_eval)
        self.best = self.dist.broadcast_object(self.best)

    def _save_checkpoint(self) -> None:
        """All ranks: each writes its RNG state; the main process the rest, trainer_state.json last."""
        final = self.ckpt_root / f"step_{self.step:06d}"
        if (final / STATE_NAME).is_file():
            return
        tmp = self.ckpt_root / f".tmp_step_{self.step:06d}"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        torch.save(_rng_state(), tmp / f"rng_state_{self.dist.rank}.pt")
        if self.dist.main:
            save_weights(self.model, tmp, self.model_config)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        self.dist.barrier()
        if self.dist.main:
            write_json(tmp / STATE_NAME, {
                "step": self.step, "micro_step": self.micro,
                "epoch": self.micro / self.sampler.batches_per_epoch,
                "samples_seen": self.micro * self.config.batch_size, "total_steps": self.total,
                "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum,
                "world_size": self.dist.world, "seed": self.config.seed, "loss": self.final_loss,
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0})
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
            os.replace(tmp, final)
            for _, old in _checkpoints(self.run_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("%s: checkpoint %s", self.desc, final.name)
        self.dist.barrier()

    def _save_final(self) -> None:
        if self.dist.main:
            with atomic_dir(self.run_dir / "model", overwrite=True) as tmp:
                save_weights(self.model, tmp, self.model_config)
        self.dist.barrier()

    def _finish(self, session_start: float, interrupted: bool) -> TrainResult:
        wall = time.perf_counter() - session_start
        images = sum(self.dist.gather(self.session_images))
        result = TrainResult(run_dir=self.run_dir, steps=self.step, final_loss=self.final_loss,
                             resumed_from=self.resumed_from, interrupted=interrupted, best=self.best,
                             history_path=self.metrics_path, last_eval=self.last_eval,
                             images_per_s=images / max(wall, 1e-9), wall_s=wall)
        if self.dist.main:
            write_json(self.run_dir / SUMMARY_NAME, {
                "finished": not interrupted, "interrupted": interrupted, "steps": self.step,
                "total_steps": self.total, "final_loss": self.final_loss, "wall_s": wall,
                "images_per_s": result.images_per_s, "resumed_from": self.resumed_from, "best": self.best,
                "last_eval": self.last_eval, "world_size": self.dist.world, "mixed_precision": self.precision,
                "device": str(self.device), "config": asdict(self.config),
                # the process's resident peak so far (an upper bound when one process ran earlier work too)
                "peak_rss_mib": _peak_rss_mib()})
            log.info("%s: %s at step %d/%d, loss %.4g, %.1f img/s", self.desc,
                     "interrupted" if interrupted else "finished", self.step, self.total, self.final_loss,
                     result.images_per_s)
        self.dist.barrier()
        return result


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:            # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)   # bytes on macOS, KiB on Linux


def _finished_result(model, run_dir: Path, total: int) -> TrainResult | None:
    """The result of an already finished run of `total` steps (weights loaded into `model`), else None."""
    summary_path, weights = run_dir / SUMMARY_NAME, run_dir / "model" / WEIGHTS_NAME
    if not (summary_path.exists() and weights.exists()):
        return None
    summary = json.loads(summary_path.read_text())
    if not summary.get("finished") or summary.get("steps") != total:
        return None
    load_weights(model, weights)
    log.info("%s already finished (%d steps): loaded its weights", run_dir, total)
    return TrainResult(run_dir=run_dir, steps=total, final_loss=summary["final_loss"],
                       resumed_from=summary.get("resumed_from"), interrupted=False, best=summary.get("best"),
                       history_path=run_dir / METRICS_NAME, last_eval=summary.get("last_eval"),
                       images_per_s=summary.get("images_per_s", 0.0), wall_s=0.0)


def train(model: torch.nn.Module, dataset: torch.utils.data.Dataset,
          loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
          config: TrainConfig, run_dir: str | os.PathLike, *, collate_fn: Callable | None = None,
          model_config: dict | None = None, eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          batch_size_of: Callable[[Any], int] | None = None, desc: str = "train") -> TrainResult:
    """Train `model` in place on `dataset`; resumes from run_dir's last checkpoint.

    `loss_fn(model, batch)` gets the plain model (never a DDP wrapper) and the collated
    batch with its tensors on the device (strings and other objects untouched); it
    returns a scalar loss, or (loss, {name: scalar}) whose extras are logged too.
    The model trains in train mode, except frozen submodules passed in eval mode; the
    modes of entry are restored on return. eval_fn runs on the main process only.
    Returns at once, with the weights loaded, if run_dir already holds a finished run
    of the same number of steps. SIGINT/SIGTERM: the current step finishes, a checkpoint
    is saved and TrainingInterrupted (a KeyboardInterrupt) is raised.
    """
    run_dir = Path(run_dir)
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"train() needs a map-style dataset with __len__; got {type(dataset).__name__}")
    finished = _finished_result(model, run_dir, total_steps_for(config, len(dataset)))
    if finished is not None:
        return finished
    run = _Run(model, dataset, loss_fn, config, run_dir, collate_fn, model_config, eval_fn, batch_size_of, desc)
    run.setup()
    return run.run()

