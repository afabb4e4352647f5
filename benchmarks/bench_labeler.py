"""Speed of the rule labeller on the real IU X-Ray reports (goal: >= 2,000 reports/s, one core).

Run: .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_labeler.py
"""
from __future__ import annotations

import time

import pytest

from cxpmrg_lib.labels import labeler
from cxpmrg_lib.labels.mesh import report_text


@pytest.mark.benchmark
def test_label_reports_throughput_on_iu_reports():
    openi = pytest.importorskip("cxpmrg_lib.data.openi")
    try:
        df = openi.load_openi_reports()
    except openi.DataError as e:
        pytest.skip(str(e))
    texts = [report_text(f, i) for f, i in zip(df["findings"], df["impression"])]
    cold, warm = [], []
    for _ in range(5):
        labeler.clear_cache()                      # each pass starts with no cached sentence
        t0 = time.perf_counter()
        labeler.label_reports(texts)
        cold.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        labeler.label_reports(texts)               # same reports again: every sentence cached
        warm.append(len(texts) / (time.perf_counter() - t0))
    labeler.clear_cache()
    t0 = time.perf_counter()
    for t in texts:
        labeler.label_report(t, use_triggers=False)
    no_shortcut = len(texts) / (time.perf_counter() - t0)
    print(f"\nrule labeller, {len(texts)} IU reports (findings + impression), single process:")
    print(f"  cold sentence cache: median {sorted(cold)[2]:,.0f} reports/s (best {max(cold):,.0f})")
    print(f"  warm sentence cache: median {sorted(warm)[2]:,.0f} reports/s")
    print(f"  cold, without trigger shortcut: {no_shortcut:,.0f} reports/s")
