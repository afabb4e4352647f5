"""Training throughput of the tiny Vision Mamba encoder (1-way, 4-way) against a same-sized ViT.

Runs `cxpmrg perf encoder` at 128, 256, 384 and 512 px in one process and writes
runs/perf/encoder.json (the efficiency chapter plots it). Prints the table with the
ratios against the ViT and the log-log slope of step time against token count.

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_encoder.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cxpmrg_lib.perf_encoder import benchmark_encoder, format_encoder_table


@pytest.mark.benchmark
def test_encoder_throughput():
    result = benchmark_encoder(out_json=Path("runs/perf/encoder.json"))
    print()
    print(format_encoder_table(result))
    # Linear in tokens means a log-log slope near 1 for the scan; attention's grows towards 2.
    assert result["scaling"]["mamba 1-way"] < 1.3
