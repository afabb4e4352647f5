"""Speed and memory of stage 3: training examples/s and report generation reports/s.

`cxpmrg perf report` measures, in one process so that ratios are fair on a noisy machine:

* training steps of the stage-3 model (forward, backward, AdamW) with the encoder trained
  (the paper) and frozen (the option; the baseline), in studies/s and images/s;
* generating the reports of `n_reports` test studies with the run's default decoding (beam
  search) and, as the baseline, greedy decoding of the same studies; the time for 500
  reports is set against the 5-minute goal;
* the peak resident memory of each phase (sampled from /proc every 10 ms; each phase runs in a
  fresh process, so the figure is that phase's own: "+MiB" above what loading the model and
  the data took).

With `run_dir` the trained stage-3 run is measured (its reports stop at end-of-report as
they do in use). Without one, an untrained model of the preset is built, whose reports
always run to the maximum length: an upper bound on generation time.
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cxpmrg_lib.perf.memory import PeakMemory
from cxpmrg_lib.trainer import adamw
from cxpmrg_lib.util.fileio import write_json

log = logging.getLogger(__name__)

__all__ = ["benchmark_report", "format_report_table", "benchmark_side_by_side", "format_side_by_side", "PeakMemory",
           "benchmark_train_scan", "format_train_scan"]

GOAL_500_REPORTS_S = 300.0


def _untrained_model(dataset_root, preset_name: str, kind: str, loader: dict | None):
    """The preset's stage-3 model, untrained: random 4-way encoder, fresh LM with a tokenizer of the train reports."""
    import tempfile

    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import VisualPrefixLM, build_report_lm, median_report_tokens, train_bpe_tokenizer
    from cxpmrg_lib.presets import get_preset
    from cxpmrg_lib.stages.studies import split_table
    from cxpmrg_lib.stages.contrastive import four_way_encoder

    preset = get_preset(preset_name)
    reports = [str(r) for r in split_table(dataset_root, "train", kind, None, loader)["report"]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer(reports, Path(tmp) / "tok")
    encoder = four_way_encoder(preset_name, None)
    lm = build_report_lm(preset.report_lm, tokenizer)
    head = VisualPrefixLM(lm, tokenizer, encoder.config.dim,
                          typical_report_tokens=median_report_tokens(tokenizer, reports))
    model = ReportModel(encoder, head)
    model.decoding = {"num_beams": 3, "repetition_penalty": 2.0, "no_repeat_ngram_size": 3}
    model.max_images = 2
    return model


# autograd nodes of the scan (pure-PyTorch Function, compiled Function): their CPU time, children included
_SCAN_NODES = ("_SelectiveScanFn", "_SelectiveScanFnBackward", "_CompiledScanFn", "_CompiledScanFnBackward")


def _time_shares(step, batch_) -> dict:
    """Where one training step's time goes: the scan's autograd nodes, the encoder's forward, the rest."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("whole step"):
            step(batch_)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    whole = totals.get("whole step", 0.0) or 1.0
    scan = sum(totals.get(k, 0.0) for k in _SCAN_NODES)
    return {"scan_share": scan / whole, "profiled_step_s": whole / 1e6}


def _train_rate(model, studies, batch: int, steps: int, freeze_encoder: bool, profile: bool = False) -> dict:
    from cxpmrg_lib.data.dataset import collate_studies

    model = copy.deepcopy(model).train()
    if freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4)
    batches = [collate_studies([studies[(k * batch + i) % len(studies)] for i in range(batch)])
               for k in range(steps + 1)]

    def step(b):
        loss = model(b["image"], b["image_mask"], b["report"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with PeakMemory() as mem:
        step(batches[0])  # warm-up
        times = []
        for b in batches[1:]:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    images = statistics.mean(float(b["image_mask"].sum()) for b in batches[1:])
    shares = _time_shares(step, batches[1]) if profile else {}
    return {**shares, "phase": f"train, encoder {'frozen' if freeze_encoder else 'trained'}", "step_s": seconds,
            "studies_per_s": batch / seconds, "images_per_s": images / seconds,
            "trainable_m": sum(p.numel() for p in params) / 1e6, "peak_extra_mib": mem.extra_mib,
            "peak_mib": mem.peak_mib}


def _generate_rate(model, studies, n: int, decoding: dict, label: str) -> dict:
    from cxpmrg_lib.stages.report import generate_reports

    subset = torch.utils.data.Subset(studies, range(min(n, len(studies))))
    model.eval()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        reports = generate_reports(model, subset, batch_size=16, **decoding)
        seconds = time.perf_counter() - t0
    words = statistics.mean(len(r.split()) for r in reports) if reports else 0.0
    return {"phase": label, "reports": len(reports), "seconds": seconds, "reports_per_s": len(reports) / seconds,
            "seconds_per_500": 500 * seconds / max(len(reports), 1), "mean_words": words,
            "peak_extra_mib": mem.extra_mib, "peak_mib": mem.peak_mib}


def _phase(task: dict) -> dict:
    """One measured phase, run in a fresh process so that its peak memory is its own."""
    from cxpmrg_lib.stages.studies import load_studies
    from cxpmrg_lib.stages.report import load_report_model

    torch.set_num_threads(task["threads"])
    torch.manual_seed(task["seed"])
    if task.get("scan"):                      # which selective scan this process uses (ssm.SCAN_ENV)
        from cxpmrg_lib.models.ssm import SCAN_ENV

        os.environ[SCAN_ENV] = {"pytorch": "torch"}.get(task["scan"], task["scan"])
    if task["run_dir"] is not None:
        model = load_report_model(task["run_dir"])
    else:
        model = _untrained_model(task["dataset_root"], task["preset"], task["kind"], task["loader"])
    size, batch = model.encoder.config.image_size, task["batch"]
    if task["phase"] == "train":
        studies, _ = load_studies(task["dataset_root"], size, "train", task["kind"], batch * (task["steps"] + 1),
                                  task["loader"], model.max_images, num_workers=0)
        row = _train_rate(model, studies, batch, task["steps"], freeze_encoder=task["freeze"],
                          profile=task.get("profile", False))
    else:
        studies, _ = load_studies(task["dataset_root"], size, "test", task["kind"], task["n"], task["loader"],
                                  model.max_images, num_workers=0)
        row = _generate_rate(model, studies, task["n"], {**model.decoding, **task["decoding"]}, task["label"])
    row["max_new_tokens"] = model.head.max_new_tokens
    row["decoding"] = {**model.decoding, **task.get("decoding", {})}
    return row


def benchmark_report(dataset_root: str | os.PathLike, run_dir: str | os.PathLike | None = None, preset: str = "tiny",
                     kind: str = "auto", loader: dict | None = None, batch: int = 16, train_steps: int = 6,
                     n_reports: int = 500, n_greedy: int = 100, out_json: str | Path | None = None,
                     seed: int = 0) -> dict:
    """Stage-3 training studies/s (encoder trained vs frozen) and generation reports/s (default vs greedy).

    Each phase runs in its own spawned process (model and data loaded there), so the peak memory
    it reports is that phase's and not what an earlier phase left in the allocator."""
    import multiprocessing as mp

    from cxpmrg_lib.util.progress import tqdm

    base = {"dataset_root": str(dataset_root), "run_dir": str(run_dir) if run_dir else None, "preset": preset,
            "kind": kind, "loader": loader, "batch": batch, "steps": train_steps, "seed": seed,
            "threads": torch.get_num_threads()}
    tasks = [{**base, "phase": "train", "freeze": False}, {**base, "phase": "train", "freeze": True},
             {**base, "phase": "generate", "n": n_reports, "decoding": {}, "label": "generate, default decoding"},
             {**base, "phase": "generate", "n": n_greedy, "decoding": {"num_beams": 1}, "label": "generate, greedy"}]
    ctx = mp.get_context("spawn")
    rows = []
    for task in tqdm(tasks, desc="stage-3 speed", unit="phase"):
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_phase, (task,)))
    source = (f"trained run {run_dir}" if run_dir is not None
              else f"untrained {preset} model (reports run to the maximum length: an upper bound)")
    decoding = rows[2]["decoding"]
    rows[2]["phase"] = f"generate, default (beam {decoding.get('num_beams', 1)})"
    result = {"source": source, "preset": preset, "batch": batch, "train_steps": train_steps,
              "max_new_tokens": rows[2]["max_new_tokens"], "decoding": decoding, "torch": torch.__version__,
              "threads": base["threads"], "machine": platform.platform(),
              "peak_rss_mib": max(r["peak_mib"] for r in rows), "rows": rows,
              "goal_500_reports_s": GOAL_500_REPORTS_S}
    if out_json is not None:
        write_json(Path(out_json), result)
    return result


def format_report_table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"stage-3 speed ({result['source']}; batch {result['batch']}, {result['threads']} threads)",
             f"{'training':<32}{'studies/s':>10}{'images/s':>10}{'trainable M':>13}{'peak +MiB':>11}"]
    train = [r for r in rows if r["phase"].startswith("train")]
    for r in train:
        lines.append(f"{r['phase']:<32}{r['studies_per_s']:>10.1f}{r['images_per_s']:>10.1f}"
                     f"{r['trainable_m']:>13.2f}{r['peak_extra_mib']:>11.0f}")
    if len(train) == 2:
        lines.append(f"trained encoder costs {train[1]['studies_per_s'] / train[0]['studies_per_s']:.2f}x "
                     "the time of a frozen one per step")
    lines.append(f"{'generation':<32}{'reports':>10}{'reports/s':>10}{'s per 500':>13}{'peak +MiB':>11}"
                 f"{'words':>8}")
    gen = [r for r in rows if r["phase"].startswith("generate")]
    for r in gen:
        lines.append(f"{r['phase']:<32}{r['reports']:>10}{r['reports_per_s']:>10.1f}{r['seconds_per_500']:>13.0f}"
                     f"{r['peak_extra_mib']:>11.0f}{r['mean_words']:>8.1f}")
    if len(gen) == 2:
        default = gen[0]
        lines.append(f"default decoding is {gen[1]['reports_per_s'] / default['reports_per_s']:.2f}x slower than "
                     f"greedy; 500 reports take {default['seconds_per_500']:.0f} s "
                     f"(goal {result['goal_500_reports_s']:.0f} s: "
                     f"{'met' if default['seconds_per_500'] <= result['goal_500_reports_s'] else 'MISSED'})")
    lines.append(f"peak resident memory of the largest phase (model, data and work): {result['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def benchmark_side_by_side(dataset_root: str | os.PathLike, preset: str = "tiny", jobs: int | None = None,
                           kind: str = "auto", loader: dict | None = None, batch: int = 16, train_steps: int = 10,
                           out_json: str | Path | None = None, seed: int = 0) -> dict:
    """Stage-3 training throughput of one process using every core (the baseline) against `jobs`
    processes side by side with cores / jobs threads each (what cxpmrg_lib.util.parallel does), with the
    encoder trained (stage 3) and frozen (the frozen-LM head alone, as in the LM swap). Each process
    loads its model and data, then times its steps; the side-by-side processes start together."""
    import multiprocessing as mp

    from cxpmrg_lib.util.parallel import MAX_AUTO_JOBS

    cores = os.cpu_count() or 1
    jobs = jobs or max(2, min(cores, MAX_AUTO_JOBS))
    base = {"dataset_root": str(dataset_root), "run_dir": None, "preset": preset, "kind": kind, "loader": loader,
            "batch": batch, "steps": train_steps, "seed": seed, "phase": "train"}
    ctx = mp.get_context("spawn")
    rows = []
    for freeze in (False, True):
        with ctx.Pool(1) as pool:
            alone = pool.apply(_phase, ({**base, "freeze": freeze, "threads": cores},))
        with ctx.Pool(jobs) as pool:
            side = pool.map(_phase, [{**base, "freeze": freeze, "threads": max(1, cores // jobs)}] * jobs)
        rows.append({"phase": alone["phase"], "alone_studies_per_s": alone["studies_per_s"],
                     "side_by_side_studies_per_s": sum(r["studies_per_s"] for r in side),
                     "per_process_studies_per_s": [r["studies_per_s"] for r in side]})
        rows[-1]["speedup"] = rows[-1]["side_by_side_studies_per_s"] / rows[-1]["alone_studies_per_s"]
    result = {"cores": cores, "jobs": jobs, "threads_each": max(1, cores // jobs), "batch": batch,
              "train_steps": train_steps, "preset": preset, "torch": torch.__version__,
              "machine": platform.platform(), "rows": rows}
    if out_json is not None:
        write_json(Path(out_json), result)
    return result


def format_side_by_side(result: dict) -> str:
    lines = [f"stage-3 training: 1 process x {result['cores']} threads against {result['jobs']} processes x "
             f"{result['threads_each']} thread(s) side by side (batch {result['batch']}, untrained {result['preset']})",
             f"{'':<28}{'alone studies/s':>17}{'side by side':>14}{'speed-up':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['phase']:<28}{r['alone_studies_per_s']:>17.1f}{r['side_by_side_studies_per_s']:>14.1f}"
                     f"{r['speedup']:>9.2f}x")
    return "\n".join(lines)


def benchmark_train_scan(dataset_root: str | os.PathLike, run_dir: str | os.PathLike | None = None,
                         preset: str = "tiny", threads=(1, 2), scans=("pytorch", "compiled"), kind: str = "auto",
                         loader: dict | None = None, batch: int = 16, train_steps: int = 8, rounds: int = 2,
                         out_json: str | Path | None = None, seed: int = 0) -> dict:
    """Stage-3 training studies/s with each selective scan (the pure-PyTorch path, "before"; the compiled
    kernel, "after") at each thread count, with the share of the step the scan takes and, for the last
    scan, the encoder-frozen step (what the LM and head cost without the encoder's backward).
    Each measurement runs in its own spawned process with CXPMRG_SCAN set there; the whole list runs
    `rounds` times, alternating the scans, and each row keeps its faster round (the median step of
    `train_steps`): load from other processes can slow a round, not speed it up."""
    import multiprocessing as mp

    from cxpmrg_lib.util.progress import tqdm

    base = {"dataset_root": str(dataset_root), "run_dir": str(run_dir) if run_dir else None, "preset": preset,
            "kind": kind, "loader": loader, "batch": batch, "steps": train_steps, "seed": seed, "phase": "train",
            "profile": True}
    tasks = []
    for t in threads:
        tasks += [{**base, "threads": int(t), "scan": scan, "freeze": False} for scan in scans]
        tasks.append({**base, "threads": int(t), "scan": scans[-1], "freeze": True})
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    ctx = mp.get_context("spawn")
    best: dict[int, dict] = {}
    for k, task in enumerate(tqdm(tasks * rounds, desc="stage-3 training per scan", unit="run")):
        with ctx.Pool(1) as pool:
            row = pool.apply(_phase, (task,))
        i = k % len(tasks)
        if i not in best or row["step_s"] < best[i]["step_s"]:
            best[i] = {**row, "scan": task["scan"], "threads": task["threads"]}
    rows = [best[i] for i in range(len(tasks))]
    result = {"preset": preset, "batch": batch, "train_steps": train_steps, "rounds": rounds, "torch": torch.__version__,
              "machine": platform.platform(), "source": f"trained run {run_dir}" if run_dir else f"untrained {preset}",
              "rows": rows}
    if out_json is not None:
        write_json(Path(out_json), result)
    return result


def format_train_scan(result: dict) -> str:
    """Studies/s per scan and thread count, the speed-up over the first scan, and the scan's share of a step."""
    rows = result["rows"]
    lines = [f"stage-3 training per selective scan ({result['source']}; batch {result['batch']}; median step of "
             f"{result['train_steps']}, the faster of {result.get('rounds', 1)} alternating rounds)",
             f"{'threads':>7}  {'scan':<9}{'encoder':<9}{'studies/s':>10}{'step s':>8}{'vs first':>9}{'scan share':>11}"]
    for r in rows:
        first = next(x for x in rows if x["threads"] == r["threads"] and x["phase"] == r["phase"])
        enc = "frozen" if r["phase"].endswith("frozen") else "trained"
        lines.append(f"{r['threads']:>7}  {r['scan']:<9}{enc:<9}{r['studies_per_s']:>10.2f}{r['step_s']:>8.2f}"
                     f"{r['studies_per_s'] / first['studies_per_s']:>8.2f}x{r.get('scan_share', float('nan')):>10.0%}")
    return "\n".join(lines)
