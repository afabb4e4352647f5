"""The training loop: `train()` runs one model on one dataset to the step budget, resuming from the last
checkpoint (see the package docstring for why a resumed or multi-process run ends with the same weights)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState
from accelerate.utils import send_to_device, set_seed

from cxpmrg_lib.data.dataset import seed_worker
from cxpmrg_lib.util.progress import tqdm
from cxpmrg_lib.util.fileio import atomic_dir, write_json
from cxpmrg_lib.trainer.checkpoint import _RunFiles, _finished_result, latest_checkpoint, save_weights
from cxpmrg_lib.trainer.config import SUMMARY_NAME, TrainConfig, TrainResult, TrainingInterrupted
from cxpmrg_lib.trainer.dist import _Dist, _signal_flag
from cxpmrg_lib.trainer.optim import _warmup_for, build_optimizer, lr_factor, total_steps_for
from cxpmrg_lib.trainer.sampler import _GlobalBatchSampler, _default_batch_size

log = logging.getLogger(__name__)


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


class _Run(_RunFiles):
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

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- set-up
    def setup(self) -> None:
        cfg = self.config
        set_seed(cfg.seed + self.dist.rank)  # distinct dropout streams per process
        self.model.to(self.device)
        # Gradients left on the model by whatever ran before (the benchmark's backbone step trains a system's
        # image network in the same process) would be added to the first step's: the optimizer clears them
        # only after each step. The benchmark's Transformer, which trained the shared CNN itself, so got
        # other weights than R2Gen, which loaded the same CNN (first loss 4.65821 against 4.65815).
        self.model.zero_grad(set_to_none=True)
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
            pin_memory=pin, worker_init_fn=seed_worker if cfg.num_workers else None,
            persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
        if self.dist.main:
            log.info("%s: %d steps (%d done), global batch %d x %d accumulation on %d process(es), %s, "
                     "mixed precision %s, %d trainable parameters", self.desc, self.total, self.step, cfg.batch_size,
                     cfg.grad_accum, self.dist.world, self.device, self.precision,
                     sum(p.numel() for p in self.params))

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
