"""Stage-3 speed on the default phantom: training studies/s (encoder trained vs frozen), generation
reports/s (default beam search vs greedy), the time for 500 test reports against the 5-minute goal,
and the peak memory of each phase. Writes runs/perf/report.json.

Measures the newest finished stage-3 run of the default phantom (make book trains it); without
one, an untrained model of the tiny preset (its reports run to the maximum length: slower).

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_report.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxpmrg_lib.data import prepare
from cxpmrg_lib.perf.report import benchmark_report, benchmark_train_scan, format_report_table, format_train_scan


def _newest_full_model_run(dataset_root: Path) -> Path | None:
    runs = Path("runs") / dataset_root.name / "tiny" / "finetune"
    done = [p.parent for p in runs.glob("*/summary.json")
            if json.loads(p.read_text()).get("init") == "stage2"]
    return max(done, key=lambda p: (p / "summary.json").stat().st_mtime) if done else None


@pytest.mark.benchmark
def test_report_speed():
    root = prepare.ensure_phantom("data", 3000, 256, 0)
    result = benchmark_report(root, run_dir=_newest_full_model_run(Path(root)),
                              out_json=Path("runs/perf/report.json"))
    print()
    print(format_report_table(result))
    default = next(r for r in result["rows"] if r["phase"].startswith("generate, default"))
    assert default["reports"] == 500
    assert default["seconds_per_500"] < 300, "500 reports with the default decoding must take under 5 minutes"


@pytest.mark.benchmark
def test_stage3_training_per_scan():
    """Stage-3 training studies/s with the pure-PyTorch scan (before) and the compiled kernel (after) at 1 and
    2 threads, the scan's share of the step, and the encoder-frozen step (the goal: >= 2x studies/s)."""
    from cxpmrg_lib.models.ssm import compiled_available

    root = prepare.ensure_phantom("data", 3000, 256, 0)
    scans = ("pytorch", "compiled") if compiled_available() else ("pytorch",)
    result = benchmark_train_scan(root, run_dir=_newest_full_model_run(Path(root)), scans=scans,
                                  out_json=Path("runs/perf/report_scan.json"))
    print()
    print(format_train_scan(result))
    for threads in (1, 2):
        rows = {r["scan"]: r for r in result["rows"] if r["threads"] == threads and r["phase"].endswith("trained")}
        if "compiled" in rows:
            ratio = rows["compiled"]["studies_per_s"] / rows["pytorch"]["studies_per_s"]
            print(f"goal stage-3 studies/s compiled >= 2x pure PyTorch at {threads} thread(s): {ratio:.2f}x "
                  f"({'met' if ratio >= 2 else 'MISSED'})")
            assert rows["compiled"]["scan_share"] < rows["pytorch"]["scan_share"]
