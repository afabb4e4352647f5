"""AdamW with weight decay on matrices only, linear warm-up then cosine decay, the step budget."""
from __future__ import annotations

import math

import torch

from cxpmrg_lib.trainer.checkpoint import _unwrap
from cxpmrg_lib.trainer.config import _POS_EMBED_RE, TrainConfig

__all__ = ["optimizer_param_groups", "build_optimizer", "adamw", "lr_factor", "total_steps_for"]


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
