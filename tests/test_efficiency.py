"""The efficiency chapter: stage times from run folders, benchmark costs, budgeted measurements, the notebook."""
import json
import math
import os
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest
import yaml

from cxpmrg_lib.chapters import efficiency
from cxpmrg_lib.chapters.pipeline import SMOKE_PARAMS, execute_notebook

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, stage: str, config: dict, elapsed: list[float], summary: dict | None = None,
         train_summary: dict | None = None, wall_s: float | None = None, bad_last_line: bool = False) -> Path:
    """A run folder as the stages write it: config.yaml, metrics.jsonl, then (when finished) the summaries."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"config": config, "resolved": {
        "stage": stage, "init": config.get("init"), "train": {"epochs": config.get("epochs", 3)}}}))
    lines = [json.dumps({"step": 10 * (i + 1), "loss": 1.0, "elapsed_s": e}) for i, e in enumerate(elapsed)]
    lines.insert(1, json.dumps({"step": 10, "eval": {"select": 0.1}}))      # eval rows carry no elapsed_s
    text = "\n".join(lines) + "\n" + ('{"step": 99, "elapsed_s": 9' if bad_last_line else "")
    (folder / "metrics.jsonl").write_text(text)
    if train_summary is not None:
        (folder / "train_summary.json").write_text(json.dumps(train_summary))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
        start = 1_700_000_000
        os.utime(folder / "config.yaml", (start, start))
        os.utime(folder / "summary.json", (start + wall_s, start + wall_s))
    return folder


@pytest.fixture
def fake_runs(tmp_path):
    dataset = tmp_path / "data" / "phantom_n60_96px_s0"          # never written: only its name files the runs
    base = tmp_path / "runs" / dataset.name / "tiny"
    _run(base / "autoregressive" / "a1", "autoregressive", {"preset": "tiny", "epochs": 8},
         elapsed=[10.0, 35.0, 70.5], summary={"steps": 40}, wall_s=90.0, bad_last_line=True,
         train_summary={"images_per_s": 12.5, "device": "cpu", "peak_rss_mib": 512.0})
    _run(base / "contrastive" / "c1", "contrastive", {"preset": "tiny", "init": "random"},
         elapsed=[6.0, 12.0], summary={"steps": 20}, wall_s=30.0, train_summary={"images_per_s": 4.0})
    _run(base / "finetune" / "f1", "finetune", {"preset": "tiny", "init": "stage2"}, elapsed=[30.0])  # unfinished
    _run(base / "report_lm" / "l1", "report_lm", {"preset": "tiny", "arch": "gpt2"}, elapsed=[60.0],
         summary={"steps": 12}, wall_s=66.0)
    # another preset and another dataset: not this run
    _run(tmp_path / "runs" / dataset.name / "base" / "autoregressive" / "x", "autoregressive", {}, [1.0],
         summary={"steps": 1}, wall_s=1.0)
    _run(tmp_path / "runs" / "other" / "tiny" / "autoregressive" / "y", "autoregressive", {}, [1.0],
         summary={"steps": 1}, wall_s=1.0)
    (base / "finetune" / "not-a-run").mkdir()                       # no config.yaml: ignored
    return tmp_path / "runs", dataset


def test_collect_stage_times_reads_the_run_folders_in_pipeline_order(fake_runs):
    run_root, dataset = fake_runs
    frame = efficiency.collect_stage_times(run_root, dataset, "tiny")
    assert list(frame["run"]) == ["a1", "c1", "l1", "f1"]
    assert list(frame["stage"]) == ["stage 1 (autoregressive)", "stage 2 (contrastive)", "report LM",
                                    "stage 3 (report generation)"]
    a1, c1, l1, f1 = (frame.iloc[i] for i in range(4))
    # the last elapsed_s (a truncated last line is skipped), wall = config.yaml -> summary.json
    assert a1["train_min"] == pytest.approx(70.5 / 60) and a1["wall_min"] == pytest.approx(1.5)
    assert a1["steps"] == 40 and a1["images_per_s"] == 12.5 and a1["peak_mib"] == 512.0 and a1["device"] == "cpu"
    assert c1["variant"] == "random init" and math.isnan(c1["peak_mib"]) and c1["wall_min"] == pytest.approx(0.5)
    assert l1["variant"].startswith("gpt2") and math.isnan(l1["images_per_s"])
    assert not f1["finished"] and math.isnan(f1["wall_min"]) and f1["train_min"] == pytest.approx(0.5)
    assert f1["variant"] == "encoder from stage 2"

    table = efficiency.stage_times_table(frame)
    total = table.loc[("total (finished runs)", "3 runs")]
    assert total["train min"] == pytest.approx(round((70.5 + 12 + 60) / 60, 2))
    assert total["wall min"] == pytest.approx(round((90 + 30 + 66) / 60, 2)) and total["steps"] == 72
    assert total["peak MiB"] == 512.0
    fig = efficiency.stage_times_figure(frame)
    assert len(fig.axes[0].patches) == 2 * 3                         # wall and train bar per finished run


def test_empty_run_root_gives_an_empty_frame_and_a_note_naming_the_notebooks(tmp_path):
    frame = efficiency.collect_stage_times(tmp_path / "runs", tmp_path / "data" / "phantom_x", "tiny")
    assert frame.empty and "train_min" in frame.columns
    note = efficiency.missing_stage_runs_note(tmp_path / "runs", tmp_path / "data" / "phantom_x", "tiny")
    assert "01_autoregressive.ipynb" in note and str(Path(tmp_path / "runs" / "phantom_x" / "tiny")) in note
    with pytest.raises(ValueError, match="no finished stage runs"):
        efficiency.stage_times_figure(frame)


def test_broken_config_names_the_file(tmp_path):
    run = tmp_path / "runs" / "ds" / "tiny" / "autoregressive" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("config: [unclosed")
    with pytest.raises(ValueError, match=r"r/config\.yaml is not valid YAML"):
        efficiency.collect_stage_times(tmp_path / "runs", tmp_path / "ds", "tiny")


def _results() -> pd.DataFrame:
    return pd.DataFrame({"system": ["mambaxray-vl", "most-common", "r2gen"],
                         "name": ["MambaXray-VL", "Most common report", "R2Gen"],
                         "family": ["MambaXray-VL", "floor", "encoder-decoder"],
                         "train_min": [4.0, 0.0, 2.5], "pretrain_min": [6.0, 0.0, 0.0],
                         "trainable_m": [3.5, 0.0, 2.0], "total_m": [5.25, 0.0, 2.0],
                         "reports_per_s": [3.0, math.nan, 8.0], "peak_mib": [120.0, 0.0, 40.0], "bleu4": [.1, .2, .3]})


def test_bench_costs_and_where_the_results_are(tmp_path):
    table = efficiency.bench_costs(_results())
    assert list(table.index) == ["MambaXray-VL", "Most common report", "R2Gen"]
    assert table.loc["MambaXray-VL", "train min incl. earlier"] == 10.0
    assert table.loc["R2Gen", "trainable M"] == 2.0 and table.loc["MambaXray-VL", "total M"] == 5.25
    assert "bleu4" not in table.columns
    with pytest.raises(ValueError, match=r"\['peak_mib'\]"):
        efficiency.bench_costs(_results().drop(columns="peak_mib"))
    fig = efficiency.bench_cost_figure(_results())                  # a system without parameters still plots
    assert len(fig.axes) == 2
    path = efficiency.bench_results_path(tmp_path / "runs", tmp_path / "data" / "phantom_n60_96px_s0", "tiny")
    assert path == tmp_path / "runs" / "phantom_n60_96px_s0" / "tiny" / "bench" / "results.csv"
    assert "04_benchmark.ipynb" in efficiency.missing_bench_note(path)


def test_budgeted_scan_measurement_at_a_tiny_size():
    result = efficiency.measure_scan(smoke=True, lengths=(16, 32), include_mambapy=False)
    table = efficiency.scan_table(result)
    assert list(table.index) == [16, 32]
    from cxpmrg_lib.models.ssm import compiled_available

    if compiled_available():
        assert list(table.columns) == [
            "reference ms", "lean_loop ms", "pytorch ms", "compiled ms", "reference MiB", "lean_loop MiB",
            "pytorch MiB", "compiled MiB", "compiled vs reference (x faster)", "compiled vs lean_loop (x faster)",
            "compiled vs pytorch (x faster)", "pytorch vs reference (x faster)", "pytorch vs lean_loop (x faster)",
            "compiled max rel. error vs reference", "pytorch max rel. error vs reference"]
        assert (table.iloc[:, :13] > 0).all().all()
        assert (table["compiled max rel. error vs reference"] < 1e-4).all()
        assert "compiled* is ssm.py's C++ kernel" in efficiency.scan_caption(result)
    else:
        assert list(table.columns) == [
            "reference ms", "lean_loop ms", "pytorch ms", "reference MiB", "lean_loop MiB", "pytorch MiB",
            "pytorch vs reference (x faster)", "pytorch vs lean_loop (x faster)", "pytorch max rel. error vs reference"]
        assert "could not be built here" in efficiency.scan_caption(result)
    assert (table["pytorch max rel. error vs reference"] < 1e-4).all()
    caption = efficiency.scan_caption(result)
    assert "mambapy is not installed" in caption and "L = 16, 32" in caption
    assert len(efficiency.scan_figure(result).axes[0].lines) == 3 + compiled_available()


def test_budgeted_encoder_measurement_at_a_tiny_size():
    result = efficiency.measure_encoder(sizes=(32, 64), batch=1, repeats=1)
    table = efficiency.encoder_table(result)
    assert table.shape == (6, 6)
    assert table.index.get_level_values("system").tolist() == ["mamba 1-way", "mamba 4-way", "vit"] * 2
    assert table["tokens"].tolist() == [4, 4, 4, 16, 16, 16]
    assert (table["images/s"] > 0).all() and (table.xs("vit", level="system")["vs ViT"] == 1.0).all()
    slope = table["slope vs previous size"]
    assert slope.xs(32, level="px").isna().all() and slope.xs(64, level="px").notna().all()
    assert set(result["scaling"]) == {"mamba 1-way", "mamba 4-way", "vit"}
    assert "fastest of 1 timed steps" in efficiency.encoder_caption(result)
    assert len(efficiency.encoder_figure(result).axes[1].lines) == 5   # three systems, two guides
    with pytest.raises(ValueError, match="repeats"):
        efficiency.measure_encoder(sizes=(32,), repeats=0)


def test_full_benchmark_is_shown_when_make_bench_wrote_it(tmp_path):
    assert efficiency.full_benchmark(tmp_path, "scan") is None
    assert "make bench" in efficiency.full_benchmark_view(tmp_path, "scan").data
    (tmp_path / "perf").mkdir()
    result = efficiency.measure_scan(smoke=True, lengths=(16,), include_mambapy=False)
    (tmp_path / "perf" / "scan.json").write_text(json.dumps(result))
    assert list(efficiency.full_benchmark_view(tmp_path, "scan").index) == [16]
    (tmp_path / "perf" / "encoder.json").write_text("{")
    with pytest.raises(ValueError, match=r"encoder\.json is not valid JSON"):
        efficiency.full_benchmark(tmp_path, "encoder")


def test_notebook_runs_alone_on_an_empty_run_root_and_says_what_to_run_first(tmp_path):
    out = tmp_path / "05_efficiency.ipynb"
    execute_notebook(ROOT / "notebooks" / "05_efficiency.ipynb", out,
                     {**SMOKE_PARAMS, "data_root": str(tmp_path / "data"), "run_root": str(tmp_path / "runs")})
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(str(o.get("text", "")) + json.dumps(o.get("data", {})) for o in outputs)
    assert "No stage runs under" in text and "01_autoregressive.ipynb" in text
    assert "No benchmark results at" in text and "04_benchmark.ipynb" in text
    assert "pytorch vs reference" in text and "mamba 4-way" in text
    assert "USDT" not in text                                        # the profiler's native log stays out of the book
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2   # the scan and encoder figures
    assert not (tmp_path / "data").exists()                          # nothing generated, nothing trained:
    runs = tmp_path / "runs"                                         # the run root holds the chapter's log only
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) == ["logs", "logs/05_efficiency.log"]


def test_side_by_side_view_reads_make_bench_json(tmp_path):
    from IPython.display import Markdown

    from cxpmrg_lib.chapters.efficiency import full_benchmark_view
    from cxpmrg_lib.util.fileio import write_json

    missing = full_benchmark_view(tmp_path, "side_by_side")
    assert isinstance(missing, Markdown) and "bench_parallel.py" in missing.data
    write_json(tmp_path / "perf" / "side_by_side.json", {
        "cores": 2, "jobs": 2, "threads_each": 1, "rows": [
            {"phase": "train, encoder trained", "alone_studies_per_s": 16.3, "side_by_side_studies_per_s": 24.5,
             "speedup": 24.5 / 16.3}]})
    table = full_benchmark_view(tmp_path, "side_by_side")
    assert table.loc["train, encoder trained", "speed-up"] == 1.5
    assert "2 processes x 1 thread(s), studies/s" in table.columns
