"""The processes: rank, world size, broadcast and gather, the one gradient all-reduce per optimizer step,
and the SIGINT/SIGTERM flag that ends a run at a checkpoint."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from cxpmrg_lib.trainer.config import TrainingInterrupted

log = logging.getLogger(__name__)


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
