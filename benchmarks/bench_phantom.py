"""Phantom generation speed at 256 px (goal: >= 150 studies/s on 2 cores).

Prints, for the current code and optionally for a baseline copy measured in the same
run: ms per study for each part (draw frontal, draw lateral, PNG encode; min over
rounds, so other load on the machine matters little), end-to-end studies/s of
`write_phantom` with 1 and 2 workers on 1,000 studies, the single-worker ms/study and
its 2-core projection, and the 1-minute load average next to every figure.

Baseline: set CXPMRG_PHANTOM_BASELINE=<dir>:<package> to a copy of an older
phantom*.py modules (+ errors.py, openi.py, fileio.py) saved as
<dir>/<package>/, e.g. /tmp/phantom_orig/pkg:phantom_orig.
Full IU X-Ray set (3,927 studies, 2 views): CXPMRG_BENCH_IU_FULL=1 (else 500 studies).

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_phantom.py
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import numpy as np
import pytest

SIZE = 256
STUDIES = 1000


def _load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def _implementations() -> dict:
    """name -> (phantom module, phantom_render module): the current code, plus the baseline if set."""
    from cxpmrg_lib.data.phantom import render as phantom_render, writer as phantom

    out = {"current": (phantom, phantom_render)}
    spec = os.environ.get("CXPMRG_PHANTOM_BASELINE")
    if spec:
        path, pkg = spec.rsplit(":", 1)
        if path not in sys.path:
            sys.path.insert(0, path)
        out["baseline"] = (importlib.import_module(f"{pkg}.phantom"), importlib.import_module(f"{pkg}.phantom_render"))
    return out


def _parts_ms(P, R, n=60, rounds=5) -> dict:
    """ms per study of each part, min over rounds of the mean over n studies."""
    specs = [P.sample_study_spec(np.random.default_rng([0, 2, i])) for i in range(n)]
    imgs = [R.render_study(s, SIZE, np.random.default_rng(i)) for i, s in enumerate(specs)]
    parts = {"draw frontal": lambda i, s: R.render_study(s, SIZE, np.random.default_rng(i)),
             "draw lateral": lambda i, s: R.render_lateral(s, SIZE, np.random.default_rng(i)),
             "PNG encode": lambda i, s: P._png_bytes(imgs[i])}
    best = {k: float("inf") for k in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            t = time.perf_counter()
            for i, s in enumerate(specs):
                fn(i, s)
            best[name] = min(best[name], 1000 * (time.perf_counter() - t) / n)
    return best


@pytest.mark.benchmark
def test_phantom_ms_per_study_by_part():
    for name, (P, R) in _implementations().items():
        ms = _parts_ms(P, R)
        print(f"\n{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + f"; CheXpert-style study (frontal + PNG) {ms['draw frontal'] + ms['PNG encode']:.2f} ms"
              + f"; IU study (2 views + 2 PNG) {ms['draw frontal'] + ms['draw lateral'] + 2 * ms['PNG encode']:.2f} ms"
              + f" [{_load()}]")


@pytest.mark.benchmark
def test_phantom_studies_per_second(tmp_path):
    for name, (P, _) in _implementations().items():
        rate = {}
        for workers in (1, 2):
            t = time.perf_counter()
            P.write_phantom(tmp_path / f"{name}{workers}", studies=STUDIES, size=SIZE, seed=0, workers=workers)
            dt = time.perf_counter() - t
            rate[workers] = STUDIES / dt
            print(f"\n{name}: write_phantom {STUDIES} studies at {SIZE} px, {workers} worker(s): {dt:.1f} s = "
                  f"{rate[workers]:.0f} studies/s [{_load()}]")
        ms1 = 1000 / rate[1]
        print(f"{name}: single worker {ms1:.2f} ms/study end to end -> 2-core projection {2 * rate[1]:.0f} studies/s "
              f"(measured {rate[2]:.0f}; a {STUDIES * 5}-study phantom in ~{5 * STUDIES / (2 * rate[1]):.0f} s)")


@pytest.mark.benchmark
def test_iu_phantom_studies_per_second(tmp_path):
    from cxpmrg_lib.data.openi import load_openi_reports

    t = time.perf_counter()
    try:
        load_openi_reports(None)
    except Exception as e:  # noqa: BLE001 - the reports are optional
        pytest.skip(f"IU X-Ray reports not available: {e}")
    parse = time.perf_counter() - t  # part of every write_iu_phantom call below
    limit = None if os.environ.get("CXPMRG_BENCH_IU_FULL") else 500
    for name, (P, _) in _implementations().items():
        t = time.perf_counter()
        out = P.write_iu_phantom(tmp_path / f"iu_{name}", size=SIZE, seed=0, workers=2, limit=limit)
        dt = time.perf_counter() - t
        n = sum(1 for _ in (out / "images").iterdir())
        print(f"\n{name}: iu-phantom {n} studies (2 views) at {SIZE} px, 2 workers: {dt:.1f} s = {n / dt:.0f} studies/s "
              f"(of which ~{parse:.1f} s parsing the reports archive) [{_load()}]")
