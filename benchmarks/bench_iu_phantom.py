"""The whole-collection iu-phantom writer (R2Gen's split) against the ordinary phantom writer, in one run.

Writes the full R2Gen iu-phantom (every report with findings and an image: 3,337 studies, 2,955 of
them with two views) and a CheXpert-style phantom of the same number of studies, both at SIZE px with
WORKERS workers, ROUNDS times alternately, and prints for each: studies/s of wall time (best round;
the iu figure includes reading the reports archive, part of every call) and CPU ms per study (user +
system of the process and its workers, best round), with the load average beside them. On a shared
machine the wall figures move with the other load; CPU time per study and the ratios hold up better.

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_iu_phantom.py
    CXPMRG_BENCH_IU_SIZE=128 CXPMRG_BENCH_IU_ROUNDS=3 ...   # another image size, more rounds
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time

import pytest

SIZE = int(os.environ.get("CXPMRG_BENCH_IU_SIZE", 64))      # 128: the book's image size
WORKERS = 2
ROUNDS = int(os.environ.get("CXPMRG_BENCH_IU_ROUNDS", 2))


def _load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the writers' pools are joined when they return)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(fn) -> tuple[float, float]:
    c, t = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t, _cpu() - c


@pytest.mark.benchmark
def test_iu_r2gen_writer_against_phantom_writer(tmp_path):
    from cxpmrg_lib.data.openi import openi_available
    from cxpmrg_lib.data.phantom import write_iu_phantom, write_phantom

    if not openi_available():
        pytest.skip("IU X-Ray reports (NLMCXR_reports.tgz) not available")
    rate = {"iu": 0.0, "phantom": 0.0}
    cpu_ms = {"iu": float("inf"), "phantom": float("inf")}
    n = images = 0
    for r in range(ROUNDS):
        out = tmp_path / f"iu{r}"
        wall, cpu = _timed(lambda: write_iu_phantom(out, size=SIZE, seed=0, workers=WORKERS, split="r2gen"))
        ann = json.loads((out / "annotation.json").read_text())
        n = sum(len(v) for v in ann.values())
        images = sum(len(it["image_path"]) for v in ann.values() for it in v)
        shutil.rmtree(out)
        rate["iu"], cpu_ms["iu"] = max(rate["iu"], n / wall), min(cpu_ms["iu"], 1000 * cpu / n)
        print(f"\nround {r}: iu-phantom (R2Gen split) {n} studies, {images} images, {SIZE} px, {WORKERS} workers: "
              f"{wall:.1f} s = {n / wall:.0f} studies/s; CPU {1000 * cpu / n:.2f} ms/study [{_load()}]")
        out = tmp_path / f"ph{r}"
        wall, cpu = _timed(lambda: write_phantom(out, studies=n, size=SIZE, seed=0, workers=WORKERS))
        shutil.rmtree(out)
        rate["phantom"], cpu_ms["phantom"] = max(rate["phantom"], n / wall), min(cpu_ms["phantom"], 1000 * cpu / n)
        print(f"\nround {r}: phantom {n} studies (one image each), {SIZE} px, {WORKERS} workers: {wall:.1f} s = "
              f"{n / wall:.0f} studies/s; CPU {1000 * cpu / n:.2f} ms/study [{_load()}]")
    per_image = images / n
    print(f"\nbest of {ROUNDS}: iu-phantom {rate['iu']:.0f} studies/s ({rate['iu'] * per_image:.0f} images/s), "
          f"{cpu_ms['iu']:.2f} CPU ms/study; phantom {rate['phantom']:.0f} studies/s, {cpu_ms['phantom']:.2f} CPU ms/study\n"
          f"iu / phantom: {rate['iu'] / rate['phantom']:.2f} in studies/s of wall time, "
          f"{cpu_ms['phantom'] / cpu_ms['iu']:.2f} in studies per CPU second, "
          f"{cpu_ms['phantom'] / cpu_ms['iu'] * per_image:.2f} in images per CPU second [{_load()}]")
    assert rate["iu"] > 0 and rate["phantom"] > 0
