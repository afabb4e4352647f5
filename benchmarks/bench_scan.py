"""Selective scan: forward+backward time and peak memory of ours vs mambapy and the reference.

Run: .venv/bin/python -m pytest -q -m benchmark -s benchmarks/bench_scan.py
Goals at L=196 (batch 8, 192 channels, state 16, float32): >= 4x faster than mambapy's
parallel scan, >= 15x faster than the sequential reference, peak memory <= half of mambapy's.
Needs mambapy (`python -m pip install mambapy==1.2.0 --no-deps`). Writes runs/perf/scan.json.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cxpmrg_lib.perf_scan import benchmark_scan, format_scan_table

OUT = Path("runs/perf/scan.json")


@pytest.mark.benchmark
def test_selective_scan_speed_and_memory():
    result = benchmark_scan(lengths=(64, 196, 784), repeats=9, include_mambapy=True, out_json=OUT)
    print("\n" + format_scan_table(result))
    print(f"written to {OUT}")
    at196 = result["lengths"]["196"]
    for name, check in at196["check_vs_reference"].items():
        assert check["output_max_rel_err"] < 1e-4 and check["grad_max_rel_err"] < 1e-4, name
    r = at196["ratios"]
    assert r["mambapy_time/ours"] >= 4.0, r
    assert r["reference_time/ours"] >= 15.0, r
    assert r["ours_mem/mambapy_mem"] <= 0.5, r
