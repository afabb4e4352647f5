"""Training throughput of the tiny Vision Mamba encoder (1-way, 4-way) against a same-sized ViT, at 1 and 2 threads.

Runs `cxpmrg perf encoder` at 128, 256, 384 and 512 px (the three encoders interleaved, the median of at least
five rounds) in one process per thread count and writes
runs/perf/encoder.json (2 threads; the efficiency chapter plots it) and runs/perf/encoder_<n>threads.json.
Prints the table with the ratios against the ViT, the log-log slope of step time against token count,
and the goals (4-way step at most 2x the ViT's at 128 px and faster from 256 px up; 1-way at most 1.2x
at 64 tokens) as met or missed. The scan is whatever selective_scan(impl="auto") takes (the compiled
kernel where it builds; CXPMRG_SCAN=torch measures the pure-PyTorch path).

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_encoder.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxpmrg_lib.models.ssm import scan_impl_name
from cxpmrg_lib.perf.encoder import benchmark_encoder, format_encoder_table


def _goals(result: dict) -> list[str]:
    step = {(r["system"], r["image_size"]): r["step_s"] for r in result["rows"]}
    out = []
    for (system, px), limit in {("mamba 4-way", 128): 2.0, ("mamba 1-way", 128): 1.2}.items():
        ratio = step[(system, px)] / step[("vit", px)]
        out.append(f"goal {system} step <= {limit}x ViT at {px} px: {ratio:.2f}x ({'met' if ratio <= limit else 'MISSED'})")
    for px in sorted({r["image_size"] for r in result["rows"] if r["image_size"] >= 256}):
        ratio = step[("mamba 4-way", px)] / step[("vit", px)]
        out.append(f"goal mamba 4-way faster than ViT at {px} px: {ratio:.2f}x ({'met' if ratio < 1 else 'MISSED'})")
    return out


@pytest.mark.benchmark
def test_encoder_throughput():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = benchmark_encoder(out_json=Path(f"runs/perf/encoder_{threads}threads.json"))
            print(f"\nscan: {scan_impl_name('cpu')}")
            print(format_encoder_table(result))
            print("\n".join(_goals(result)))
            # Linear in tokens means a log-log slope near 1 for the scan; attention's grows towards 2.
            assert result["scaling"]["mamba 1-way"] < 1.3
    finally:
        torch.set_num_threads(before)
    Path("runs/perf/encoder.json").write_bytes(Path("runs/perf/encoder_2threads.json").read_bytes())
