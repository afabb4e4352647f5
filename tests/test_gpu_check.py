"""benchmarks/gpu_check.py's CPU dry run (--device cpu --tiny): every section runs and reports real numbers.

The script runs in a child process (it sets TRITON_INTERPRET=1 before triton is imported, so the Triton
kernels run in the CPU interpreter when triton is installed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _dry_run(out: Path, sections: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)           # the script sets it itself for --device cpu
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out),
                           "--sections", sections], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert (out / "gpu_check.json").exists(), f"no JSON written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_parity_scan_and_training_steps(tmp_path):
    proc, result, md = _dry_run(tmp_path, "parity,scan,steps")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    sections = result["sections"]
    assert set(sections) == {"parity", "scan", "steps"}
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("why") for k, s in sections.items()}
    assert result["environment"]["device"] == "cpu" and result["environment"]["tiny"] is True

    parity = sections["parity"]["rows"]
    ran = {(r["A"], r["dtype"], r["impl"]) for r in parity if r["status"] == "ok"}
    for a in ("shared", "per-sequence"):
        for dtype in ("float32", "bfloat16"):
            assert (a, dtype, "fast") in ran
            if HAS_TRITON:        # the kernels ran in the interpreter: forward, final state and gradients checked
                assert (a, dtype, "triton") in ran, parity
    for r in parity:
        if r["status"] == "ok":
            assert 0 <= r["forward"] < 1e-3 and 0 <= r["grad_max"] < 5e-2, r
            if r["dtype"] == "float32":
                assert r["grad_max"] < 1e-4, r
            if r["impl"] == "triton":
                assert r["last_state"] < 1e-4, r
    mamba = [r for r in parity if r["impl"] == "mamba-ssm"]
    assert mamba and all(r["status"] == "skipped" and r["why"] for r in mamba)    # never silently absent

    scan = sections["scan"]["rows"]
    assert {r["length"] for r in scan} == {16, 32}
    assert all(r["fwd_bwd_ms"] > 0 for r in scan if r["status"] == "ok")
    assert any(r["impl"] == "fast" and r["status"] == "ok" for r in scan)

    steps = sections["steps"]["rows"]
    assert [r["stage"] for r in steps] == ["stage 1 (ARM)", "stage 2 (contrastive)", "stage 3 (frozen LM)"]
    for r in steps:
        assert r["status"] == "ok" and r["finite"] and r["step_s"] > 0 and r["peak_gib"] is None, r
    frozen = steps[2]
    assert frozen["trainable_M"] < frozen["params_M"]          # the LM is frozen: fewer trainable parameters

    for heading in ("## parity: ok", "## scan: ok", "## steps: ok", "| stage 3 (frozen LM) |"):
        assert heading in md, md
    if not HAS_TRITON:
        assert "triton does not import" in md


@pytest.mark.slow
def test_dry_run_stage3_on_the_phantom(tmp_path):
    proc, result, md = _dry_run(tmp_path, "stage3")
    sec = result["sections"]["stage3"]
    assert proc.returncode == 0 and sec["status"] == "ok", f"{sec}\n{proc.stderr[-4000:]}"
    runs = sec["runs"]
    assert set(runs) == {"earlier stages (cpu)", "cpu", "cpu (again)"}
    assert runs["cpu"]["steps"] == runs["cpu (again)"]["steps"] == 2
    by_metric = {r["metric"]: r for r in sec["rows"]}
    assert {"bleu4", "rouge_l", "ce_f1"} <= set(by_metric)
    # the same stage 3 twice on the CPU from the same start: the same reports, so the same metrics
    for r in by_metric.values():
        assert r["device"] == r["cpu"] and r["within_ci"] in (True, None), r
    assert "## stage3: ok" in md
