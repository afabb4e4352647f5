"""Weights in safetensors, checkpoints to resume from (weights, optimizer, scheduler, RNG state per rank,
trainer_state.json last), and the run folder's files as the training loop writes them."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from cxpmrg_lib.util.fileio import atomic_dir, atomic_path, write_json, write_text
from cxpmrg_lib.runs import read_metrics
from cxpmrg_lib.trainer.config import (CONFIG_NAME, METRICS_NAME, STATE_NAME, SUMMARY_NAME, WEIGHTS_NAME, _CKPT_RE,
                                       TrainResult)

log = logging.getLogger(__name__)


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


class _RunFiles:
    """What a run keeps on disk: metrics.jsonl, checkpoints (resume), the best and the final weights.
    The file half of the training loop (`loop._Run`), which holds the model, optimizer and step."""

    # -- paths
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

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

    def _append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

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
