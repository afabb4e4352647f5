"""Why independent runs train side by side: stage-3 training studies/s of one process using every
core against two (or more) processes with the cores shared out, on the default phantom. The book's
notebooks use it (cxpmrg_lib.util.parallel) for 02's and 03's runs and the benchmark's systems.
Writes runs/perf/side_by_side.json.

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_parallel.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cxpmrg_lib.data import prepare
from cxpmrg_lib.perf.report import benchmark_side_by_side, format_side_by_side


@pytest.mark.benchmark
def test_side_by_side_training():
    root = prepare.ensure_phantom("data", prepare.DEFAULT_PHANTOM_STUDIES, prepare.DEFAULT_PHANTOM_SIZE, 0)
    result = benchmark_side_by_side(root, out_json=Path("runs/perf/side_by_side.json"))
    print()
    print(format_side_by_side(result))
    # Workers are worth it only if they beat one process using every core.
    assert result["rows"][0]["speedup"] > 1.0
