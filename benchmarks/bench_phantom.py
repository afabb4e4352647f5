"""Phantom generation speed: studies/s at 256 px, 1 vs 2 workers (goal: >= 150/s on 2 cores)."""
from __future__ import annotations

import time

import pytest

from cxpmrg_lib.data.phantom import write_phantom, write_iu_phantom


@pytest.mark.benchmark
@pytest.mark.parametrize("workers", [1, 2])
def test_phantom_studies_per_second(tmp_path, workers):
    n = 1000
    t = time.perf_counter()
    write_phantom(tmp_path / "ph", studies=n, size=256, seed=0, workers=workers)
    dt = time.perf_counter() - t
    print(f"\nphantom: {n} studies at 256 px, {workers} worker(s): {dt:.1f} s = {n / dt:.0f} studies/s")


@pytest.mark.benchmark
def test_iu_phantom_studies_per_second(tmp_path):
    n = 500
    t = time.perf_counter()
    write_iu_phantom(tmp_path / "iu", size=256, seed=0, workers=2, limit=n)
    dt = time.perf_counter() - t
    print(f"\niu-phantom: {n} studies (2 views) at 256 px, 2 workers: {dt:.1f} s = {n / dt:.0f} studies/s")
