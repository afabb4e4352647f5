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

Modules: config (TrainConfig, TrainResult), optim (AdamW, schedule, step budget), sampler (the data
order), dist (processes, the gradient all-reduce), checkpoint (weights, checkpoints, the run's files),
loop (`train()`).
"""
from cxpmrg_lib.runs import read_metrics
from cxpmrg_lib.trainer.checkpoint import latest_checkpoint, load_weights, save_weights
from cxpmrg_lib.trainer.config import TrainConfig, TrainingInterrupted, TrainResult
from cxpmrg_lib.trainer.loop import train
from cxpmrg_lib.trainer.optim import adamw, build_optimizer, lr_factor, optimizer_param_groups, total_steps_for

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "load_weights", "save_weights",
           "read_metrics", "latest_checkpoint", "optimizer_param_groups", "build_optimizer", "adamw", "lr_factor",
           "total_steps_for"]
