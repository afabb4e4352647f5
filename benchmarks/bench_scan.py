"""Selective scan: forward+backward time and peak memory of ours (compiled, pure PyTorch) vs mambapy and the
reference, at 1 and at 2 threads in the same run.

Run: .venv/bin/python -m pytest -q -m benchmark -s benchmarks/bench_scan.py
Goals at L=196 (batch 8, 192 channels, state 16, float32): the compiled kernel >= 30x mambapy's parallel
scan and >= 4x the pure-PyTorch path, with peak memory no higher than the pure-PyTorch path's; the
pure-PyTorch path >= 4x mambapy and >= 15x the sequential reference. Correctness is asserted; the speed
goals are printed as met or missed (the figures are what they are on the machine at hand).
Needs mambapy (`python -m pip install mambapy==1.2.0 --no-deps`). Writes runs/perf/scan.json (the last
thread count) and runs/perf/scan_<n>threads.json.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxpmrg_lib.perf.scan import benchmark_scan, format_scan_table

OUT = Path("runs/perf/scan.json")
GOALS = {"mambapy_time/compiled": 30.0, "pytorch_time/compiled": 4.0, "mambapy_time/pytorch": 4.0,
         "reference_time/pytorch": 15.0}


@pytest.mark.benchmark
def test_selective_scan_speed_and_memory():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = benchmark_scan(lengths=(64, 196, 784), repeats=9, include_mambapy=True,
                                    out_json=OUT.with_name(f"scan_{threads}threads.json"))
            print(f"\n{threads} thread(s)\n" + format_scan_table(result))
            at196 = result["lengths"]["196"]
            for name, check in at196["check_vs_reference"].items():
                assert check["output_max_rel_err"] < 1e-4 and check["grad_max_rel_err"] < 1e-4, name
            r = at196["ratios"]
            for key, goal in GOALS.items():
                if key in r:
                    print(f"goal {key} >= {goal:g}: {r[key]:.2f} ({'met' if r[key] >= goal else 'MISSED'})")
            if "compiled_mem/pytorch_mem" in r:
                mem = r["compiled_mem/pytorch_mem"]
                print(f"goal compiled peak memory <= pure PyTorch's: {mem:.3f}x ({'met' if mem <= 1 else 'MISSED'})")
                assert mem <= 1.0, r
    finally:
        torch.set_num_threads(before)
    OUT.write_bytes(OUT.with_name("scan_2threads.json").read_bytes())
    print(f"written to {OUT}")
