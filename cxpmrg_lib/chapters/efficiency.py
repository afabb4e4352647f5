"""The efficiency chapter's data: quick scan and encoder measurements, stage wall times, benchmark costs.

The measurements here are budgeted versions of benchmarks/bench_scan.py and
benchmarks/bench_encoder.py (`make bench` runs the full ones and writes runs/perf/*.json):
small enough to run inside `make book` (about half a minute on 2 cores; seconds with `smoke=True`),
large enough to show the orderings. Stage times and benchmark costs are only read from what
the earlier notebooks wrote; nothing is trained here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxpmrg_lib.runs import (dataset_dir, is_finished, read_config, read_summary, read_train_summary,
                             train_seconds)

log = logging.getLogger(__name__)

__all__ = ["machine_summary", "set_threads", "SCAN_SETTINGS", "ENCODER_SETTINGS", "STAGES", "mambapy_available",
           "measure_scan", "scan_caption", "scan_table", "scan_figure", "measure_encoder", "encoder_caption",
           "encoder_table", "encoder_figure", "full_benchmark", "full_benchmark_view", "collect_stage_times",
           "stage_times_table", "stage_times_figure", "missing_stage_runs_note", "bench_results_path", "bench_costs",
           "bench_cost_figure", "missing_bench_note"]

# Budgets. The sequential reference's backward grows as L^2 (at batch 4 x 128 channels one step takes
# ~0.3 s at L=196 and ~4 s at L=576 on one core), so the book stops at L=196, the paper's 14x14 grid.
SCAN_SETTINGS = {"default": dict(lengths=(64, 196), batch=4, channels=128, state=16, repeats=5),
                 "smoke": dict(lengths=(32, 64), batch=2, channels=32, state=8, repeats=1)}
# One warm-up and `repeats` timed training steps per encoder and size; 512 px dominates (~10 s on one core).
ENCODER_SETTINGS = {"default": dict(sizes=(128, 256, 384, 512), batch=2, repeats=3),
                    "smoke": dict(sizes=(64, 128), batch=1, repeats=1)}
# Stage folders under <run_root>/<dataset>/<preset>/, in pipeline order.
STAGES = {"autoregressive": "stage 1 (autoregressive)", "contrastive": "stage 2 (contrastive)",
          "report_lm": "report LM", "finetune": "stage 3 (report generation)"}
_INIT_NAMES = {"stage1": "encoder from stage 1", "stage2": "encoder from stage 2", "random": "random init",
               "stage2_random": "encoder from stage 2 without stage 1"}
SCAN_IMPLS = ("reference", "lean_loop", "mambapy", "pytorch", "compiled")
OURS = ("compiled", "pytorch")     # ssm.py's C++ kernel (every stage's CPU path) and its pure-PyTorch fallback


# ----------------------------------------------------------------------------- the machine

def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(threads: int = 0) -> int:
    """Use `threads` torch threads (0: leave torch's default, the number of cores); returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def machine_summary() -> str:
    """One line naming what the timings below were measured on: timings mean nothing without it."""
    import torch

    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    from cxpmrg_lib.models.ssm_build import kernel_lanes

    return (f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}; compiled scan: "
            f"{kernel_lanes()}; load average {load} "
            "(other processes slow every system alike: the implementations are timed in turn, interleaved)")


# ----------------------------------------------------------------------------- (1) the selective scan

def mambapy_available() -> bool:
    """mambapy is the scan benchmark's optional baseline (`make bench` installs it), not a dependency."""
    return importlib.util.find_spec("mambapy") is not None


def measure_scan(smoke: bool = False, **overrides) -> dict:
    """perf.scan.benchmark_scan at the book's budget; mambapy joins the table when it is importable."""
    from cxpmrg_lib.perf.scan import benchmark_scan

    settings = {**SCAN_SETTINGS["smoke" if smoke else "default"], **overrides}
    settings.setdefault("include_mambapy", mambapy_available())
    if not settings["include_mambapy"]:
        log.info("mambapy is not installed: the scan table shows ours against the sequential loops only")
    with _native_stderr_silenced():
        return benchmark_scan(**settings)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler behind the scan's memory figures (kineto) writes two "USDT ... profiler_start/stop"
    lines per profiled run straight to file descriptor 2, which a notebook kernel copies into the book.
    Python's own sys.stderr (logging, warnings) is not that descriptor in a kernel and still shows."""
    try:
        saved = os.dup(2)
    except OSError:           # no descriptor 2 at all: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def scan_table(result: dict) -> pd.DataFrame:
    """One row per sequence length: median forward+backward ms, peak MiB, speed-ups of ours (the compiled
    kernel, the pure-PyTorch path) over the others, and each one's check against the reference (largest
    relative error of the output and input gradients)."""
    rows = []
    for length, e in result["lengths"].items():
        row = {"L": int(length)}
        impls = [n for n in SCAN_IMPLS if n in e["time_s"]]
        row.update({f"{n} ms": e["time_s"][n] * 1e3 for n in impls})
        row.update({f"{n} MiB": e["peak_mem_bytes"][n] / 2 ** 20 for n in impls})
        for ours in (o for o in OURS if o in impls):
            row.update({f"{ours} vs {n} (x faster)": e["time_s"][n] / e["time_s"][ours] for n in impls
                        if n != ours and not (ours == "pytorch" and n == "compiled")})
        for ours in (o for o in OURS if o in impls):
            row[f"{ours} max rel. error vs reference"] = max(e["check_vs_reference"][ours].values())
        rows.append(row)
    return pd.DataFrame(rows).set_index("L")


def scan_caption(result: dict) -> str:
    """How the scan table was measured, and whether mambapy is in it."""
    cfg, env = result["config"], result["environment"]
    lengths = ", ".join(result["lengths"])
    text = (f"Forward + backward of one Mamba selective scan (batch {cfg['batch']}, {cfg['channels']} channels, "
            f"state {cfg['state']}, {cfg['dtype']}, with D, the z gate and softplus(delta + bias)) at L = {lengths}; "
            f"median of {cfg['repeats']} timed runs after one warm-up (the sequential loops at most "
            f"{cfg['slow_max_rounds']}), the implementations interleaved; {env['num_threads']} threads, "
            f"torch {env['torch']}. Peak memory: the CPU allocator's high-water mark during one forward + backward.")
    if env.get("compiled"):
        text += (" *compiled* is ssm.py's C++ kernel (the path every stage takes on a CPU), *pytorch* its "
                 "pure-PyTorch fallback (taken where no C++ compiler is available; same results).")
    else:
        text += (" **The compiled kernel could not be built here** (no C++ compiler?), so only the pure-PyTorch "
                 "path (*pytorch*) is shown as ours.")
    if env.get("mambapy"):
        text += f" mambapy {env['mambapy']} (parallel scan) is included."
    else:
        text += (" **mambapy is not installed here**, so the table compares ours with the sequential reference "
                 "and a leaner loop only; `make bench` installs mambapy 1.2.0 and runs the full benchmark.")
    return text


def scan_figure(result: dict, title: str | None = None) -> plt.Figure:
    """Time and peak memory per implementation against sequence length (log scales)."""
    lengths = [int(k) for k in result["lengths"]]
    entries = list(result["lengths"].values())
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in SCAN_IMPLS:
        if name not in entries[0]["time_s"]:
            continue
        style = dict(marker="o", lw=2.5 if name in OURS else 1.3, label=name.replace("_", " "))
        ax_t.plot(lengths, [e["time_s"][name] * 1e3 for e in entries], **style)
        ax_m.plot(lengths, [e["peak_mem_bytes"][name] / 2 ** 20 for e in entries], **style)
    ax_t.set_yscale("log")
    ax_m.set_ylim(bottom=0)
    for ax, label in ((ax_t, "forward + backward (ms, median)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_xticks(lengths, [str(v) for v in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    ax_t.legend(fontsize=8)
    cfg, env = result["config"], result["environment"]
    fig.suptitle(title or f"Selective scan (batch {cfg['batch']}, {cfg['channels']} channels, state {cfg['state']}, "
                          f"{env['num_threads']} CPU threads)", fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- (2) encoder throughput

def measure_encoder(smoke: bool = False, preset: str = "tiny", seed: int = 0, **overrides) -> dict:
    """Training step time of the preset's Vision Mamba (1-way, 4-way) and a same-size ViT at each input size.

    perf.encoder.benchmark_encoder on the book's budget (few rounds, one warm-up, batch 2). With so few
    rounds, load from other processes matters more than in the full benchmark, so the fastest of the
    interleaved steps counts (a step can be slowed by another process but not sped up); the full
    benchmark reports the median of more rounds.
    """
    from cxpmrg_lib.perf.encoder import benchmark_encoder

    settings = {**ENCODER_SETTINGS["smoke" if smoke else "default"], **overrides}
    result = benchmark_encoder(sizes=settings["sizes"], batch=settings["batch"], repeats=settings["repeats"],
                               preset=preset, seed=seed, statistic="min", min_seconds=0.0, warmup=1)
    return {**result, "processor": cpu_name()}


def encoder_table(result: dict) -> pd.DataFrame:
    """Images/s per system and size, the ratio to the ViT, and the local log-log slope of step time against tokens."""
    frame = pd.DataFrame(result["rows"])
    vit = frame[frame["system"] == "vit"].set_index("image_size")["images_per_s"]
    frame["vs ViT"] = frame["images_per_s"] / frame["image_size"].map(vit)
    frame["slope vs previous size"] = math.nan
    for _, group in frame.groupby("system", sort=False):
        group = group.sort_values("tokens")
        t, n = np.log(group["step_s"].to_numpy()), np.log(group["tokens"].to_numpy())
        frame.loc[group.index[1:], "slope vs previous size"] = np.diff(t) / np.diff(n)
    frame = frame.rename(columns={"image_size": "px", "step_s": "step s", "images_per_s": "images/s",
                                  "params_m": "params M"})
    return frame.set_index(["system", "px"])[["tokens", "images/s", "vs ViT", "step s", "slope vs previous size",
                                              "params M"]]


def encoder_caption(result: dict) -> str:
    statistic = result.get("statistic", "median")
    how = ("the fastest of {n} timed steps, the three encoders interleaved" if statistic.startswith("min")
           else "median of {n} timed steps").format(n=result["repeats"])
    return (f"One training step (forward, backward, AdamW update) of each encoder on random images, batch "
            f"{result['batch']}: {how}, after one warm-up, all in one process; "
            f"{result['threads']} threads, torch {result['torch']}. Log-log slope of step time against tokens over "
            "all sizes (1 = linear, 2 = quadratic): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["scaling"].items()) + ".")


def encoder_figure(result: dict) -> plt.Figure:
    """Left: training images/s against input size. Right: step time against tokens (log-log) with
    the slopes of linear and quadratic growth drawn through the smallest size."""
    frame = pd.DataFrame(result["rows"])
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(10.5, 4))
    colors = {"mamba 1-way": "tab:red", "mamba 4-way": "tab:orange", "vit": "tab:blue"}
    for name, g in frame.groupby("system", sort=False):
        c = colors.get(name, "black")
        label = "ViT (attention)" if name == "vit" else f"Vision Mamba, {name.split()[1]} scan"
        ax_r.plot(g["image_size"], g["images_per_s"], marker="o", color=c, label=label)
        ax_t.plot(g["tokens"], g["step_s"], marker="o", color=c, label=label)
    tokens = np.array(sorted(frame["tokens"].unique()), dtype=float)
    if len(tokens) >= 2:
        t0 = float(np.exp(np.log(frame.loc[frame["tokens"] == tokens[0], "step_s"]).mean()))
        ax_t.plot(tokens, t0 * tokens / tokens[0], ls="--", color="gray", lw=1, label="∝ tokens (linear)")
        ax_t.plot(tokens, t0 * (tokens / tokens[0]) ** 2, ls=":", color="gray", lw=1.5,
                  label="∝ tokens² (quadratic)")
    ax_r.set_xlabel("input size (px)")
    ax_r.set_ylabel("training images/s")
    ax_r.set_yscale("log")
    ax_r.set_xticks(sorted(frame["image_size"].unique()))
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_xticks(tokens, [str(int(v)) for v in tokens])
    ax_t.minorticks_off()
    ax_t.set_xlabel("tokens per image")
    ax_t.set_ylabel("seconds per training step")
    for ax in (ax_r, ax_t):
        ax.grid(alpha=0.3, which="both")
    ax_r.legend(fontsize=8)
    ax_t.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Encoder training throughput (preset {result['preset']}: dim {result['dim']}, depth "
                 f"{result['depth']}, patch {result['patch_size']}; batch {result['batch']}, "
                 f"{result['threads']} CPU threads)", fontsize=11)
    fig.tight_layout()
    return fig


def full_benchmark(run_root: str | os.PathLike, name: str) -> dict | None:
    """The full measurement `make bench` wrote (runs/perf/scan.json or encoder.json), or None."""
    path = Path(run_root) / "perf" / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rerun `make bench`") from None


def full_benchmark_view(run_root: str | os.PathLike, name: str):
    """The table of `make bench`'s full measurement (name "scan", "encoder" or "side_by_side"), or a
    Markdown line saying how to get it."""
    from IPython.display import Markdown

    result = full_benchmark(run_root, name)
    if result is None:
        script = "parallel" if name == "side_by_side" else name
        return Markdown(f"The full {name.replace('_', '-')} benchmark has not been run on this machine (`make bench` "
                        f"writes `{Path(run_root) / 'perf' / (name + '.json')}`; benchmarks/bench_{script}.py).")
    if name == "side_by_side":
        return side_by_side_table(result)
    return scan_table(result).round(3) if name == "scan" else encoder_table(result).round(3)


def side_by_side_table(result: dict) -> pd.DataFrame:
    """Stage-3 training studies/s: one process on every core against worker processes side by side."""
    alone = f"1 process x {result['cores']} threads"
    side = f"{result['jobs']} processes x {result['threads_each']} thread(s)"
    return pd.DataFrame([{"training": r["phase"], f"{alone}, studies/s": round(r["alone_studies_per_s"], 1),
                          f"{side}, studies/s": round(r["side_by_side_studies_per_s"], 1),
                          "speed-up": round(r["speedup"], 2)} for r in result["rows"]]).set_index("training")


# ----------------------------------------------------------------------------- (3) stage wall times

def _variant(stage: str, cfg: dict) -> str:
    config, resolved = cfg.get("config") or {}, cfg.get("resolved") or {}
    if stage in ("contrastive", "finetune"):
        init = config.get("init") or resolved.get("init")
        variant = _INIT_NAMES.get(init, str(init))
        if config.get("freeze_encoder"):
            variant += ", encoder frozen"
        return variant
    if stage == "report_lm":
        return f"{config.get('arch', 'llama')} LM on the train reports"
    return "1-way encoder + cluster decoder"


def collect_stage_times(run_root: str | os.PathLike, dataset_root: str | os.PathLike,
                        preset: str = "tiny") -> pd.DataFrame:
    """One row per stage run under run_root/<dataset>/<preset>/ (finished or not), in pipeline order.

    train_min: the training loop (validation included) from metrics.jsonl, resumes included.
    wall_min: config.yaml (written when the last attempt started) to summary.json (written last),
    i.e. data loading, training and the test evaluation of that attempt (longer when a later call
    redid only the test predictions of a finished stage-3 run, which rewrites summary.json).
    peak_mib: the peak resident memory recorded by the trainer (train_summary.json `peak_rss_mib`),
    NaN for runs that did not record it.
    """
    base = dataset_dir(run_root, dataset_root, preset)
    rows = []
    for stage, stage_name in STAGES.items():
        folder = base / stage
        if not folder.is_dir():
            continue
        runs = [p for p in folder.iterdir() if (p / "config.yaml").is_file()]
        for run in sorted(runs, key=lambda p: ((p / "config.yaml").stat().st_mtime, p.name)):   # in order of start
            cfg = read_config(run)
            summary, trained = read_summary(run, missing_ok=True), read_train_summary(run)
            finished = is_finished(run)
            wall = ((run / "summary.json").stat().st_mtime - (run / "config.yaml").stat().st_mtime
                    if finished else math.nan)
            train = (cfg.get("resolved") or {}).get("train") or {}
            peak = trained.get("peak_rss_mib", summary.get("peak_rss_mib", math.nan))
            rows.append({"stage": stage_name, "variant": _variant(stage, cfg), "run": run.name,
                         "finished": finished, "epochs": train.get("epochs"), "steps": summary.get("steps"),
                         "train_min": train_seconds(run) / 60, "wall_min": wall / 60,
                         "images_per_s": trained.get("images_per_s", math.nan),
                         "peak_mib": float(peak) if peak is not None else math.nan,
                         "device": trained.get("device"), "path": str(run)})
    columns = ["stage", "variant", "run", "finished", "epochs", "steps", "train_min", "wall_min", "images_per_s",
               "peak_mib", "device", "path"]
    return pd.DataFrame(rows, columns=columns)


def stage_times_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The collected stage runs as the book shows them, with a total row of the finished ones."""
    shown = frame[["stage", "variant", "run", "finished", "epochs", "steps", "train_min", "wall_min",
                   "images_per_s", "peak_mib"]].copy()
    done = frame[frame["finished"]]
    total = {"stage": "total (finished runs)", "variant": f"{len(done)} runs", "run": "", "finished": True,
             "epochs": None, "steps": done["steps"].sum(), "train_min": done["train_min"].sum(),
             "wall_min": done["wall_min"].sum(), "images_per_s": math.nan,
             "peak_mib": done["peak_mib"].max() if done["peak_mib"].notna().any() else math.nan}
    shown = pd.concat([shown, pd.DataFrame([total])], ignore_index=True)
    return shown.rename(columns={"train_min": "train min", "wall_min": "wall min", "images_per_s": "images/s",
                                 "peak_mib": "peak MiB"}).set_index(["stage", "variant"]).round(2)


def stage_times_figure(frame: pd.DataFrame, note: str | None = None) -> plt.Figure:
    """Wall minutes per finished stage run, the training loop's share darker."""
    done = frame[frame["finished"]].reset_index(drop=True)
    if done.empty:
        raise ValueError("no finished stage runs to plot")
    labels = [f"{r.stage}\n{r.variant} [{r.run[:6]}]" for r in done.itertuples()]
    y = np.arange(len(done))[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(done) + 1.4))
    wall = done["wall_min"].fillna(done["train_min"])
    ax.barh(y, wall, color="tab:blue", alpha=0.35, label="wall (data, training, evaluation)")
    ax.barh(y, done["train_min"].fillna(0), color="tab:blue", label="training loop")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("minutes")
    ax.set_title("Stage wall times of this run root")
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="gray")
    fig.tight_layout()
    return fig


def missing_stage_runs_note(run_root, dataset_root, preset: str = "tiny") -> str:
    return (f"No stage runs under `{dataset_dir(run_root, dataset_root, preset)}`: run "
            "`notebooks/01_autoregressive.ipynb`, `02_contrastive.ipynb` and `03_finetune.ipynb` first (with the "
            "same data_root, phantom and preset parameters), or `make book`, which runs them in order.")


# ----------------------------------------------------------------------------- (4) benchmark costs

def bench_results_path(run_root, dataset_root, preset: str = "tiny") -> Path:
    """results.csv of the benchmark folder notebook 04 writes for this dataset and preset (bench.bench_dir)."""
    from cxpmrg_lib.bench import BenchConfig, bench_dir

    return bench_dir(BenchConfig(dataset_root=str(dataset_root), preset=preset, run_root=str(run_root))) / "results.csv"


COST_COLUMNS = ["family", "train_min", "pretrain_min", "trainable_m", "total_m", "reports_per_s", "peak_mib"]


def bench_costs(results: pd.DataFrame) -> pd.DataFrame:
    """Parameters, training minutes and generation speed per benchmarked system."""
    missing = [c for c in ["name"] + COST_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"benchmark results lack the column(s) {missing}; rerun notebooks/04_benchmark.ipynb")
    table = results.set_index("name")[COST_COLUMNS].copy()
    table.insert(3, "total_train_min", table["train_min"] + table["pretrain_min"])
    return table.rename(columns={"train_min": "train min", "pretrain_min": "earlier stages min",
                                 "total_train_min": "train min incl. earlier", "trainable_m": "trainable M",
                                 "total_m": "total M", "reports_per_s": "reports/s",
                                 "peak_mib": "generation peak +MiB"}).round(3)


def bench_cost_figure(results: pd.DataFrame, note: str | None = None) -> plt.Figure:
    """Left: training minutes per system (own training solid, earlier stages it reuses hatched).
    Right: trainable against total parameters (log scale)."""
    from cxpmrg_lib.chapters.viz import FAMILY_COLORS

    r = results.reset_index(drop=True)
    y = np.arange(len(r))[::-1]
    colors = [FAMILY_COLORS.get(f, "#333333") for f in r["family"]]
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 0.42 * len(r) + 1.6), sharey=True)
    ax_t.barh(y, r["train_min"], color=colors)
    ax_t.barh(y, r["pretrain_min"].fillna(0), left=r["train_min"], color=colors, alpha=0.35, hatch="//")
    ax_t.set_yticks(y, r["name"], fontsize=8)
    ax_t.set_xlabel("training minutes (hatched: earlier stages reused)")
    # a system without parameters (the most common report) has no bar on the log axis
    ax_p.barh(y + 0.2, r["total_m"].where(r["total_m"] > 0), height=0.4, color="lightgray", label="total")
    ax_p.barh(y - 0.2, r["trainable_m"].where(r["trainable_m"] > 0), height=0.4, color=colors, label="trainable")
    ax_p.set_xscale("log")
    ax_p.set_xlabel("parameters (millions, log)")
    ax_p.legend(fontsize=8, loc="lower right")
    for ax in (ax_t, ax_p):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Cost of each benchmarked system", fontsize=11)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="gray")
    fig.tight_layout()
    return fig


def missing_bench_note(path: Path) -> str:
    return (f"No benchmark results at `{path}`: run `notebooks/04_benchmark.ipynb` first (with the same data_root, "
            "phantom and preset parameters), or `make book`.")
