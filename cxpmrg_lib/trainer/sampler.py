"""The data order: global batch i of an epoch is slice i of a seeded permutation, rank r takes part r of it,
so a resumed run and a run on P processes see the batches of one uninterrupted 1-process run."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np
import torch


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
