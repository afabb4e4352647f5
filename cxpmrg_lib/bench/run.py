"""Running the benchmark: each asked-for system trained (or reused) in worker processes, its speed measured,
its reports scored against the reference's, and its row appended to results.csv."""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxpmrg_lib.bench.config import BenchConfig, bench_dir
from cxpmrg_lib.bench import mechanisms
from cxpmrg_lib.bench.runners import RUNNERS as _BASE_RUNNERS, _FeatureSet, _mamba_config, _stage2_tokens
from cxpmrg_lib.bench.systems import REFERENCE, SYSTEMS, System
from cxpmrg_lib.bench.training import _Data, _Fitted, _lm_epochs, _load_data, _report_lm_call, _stage2_call
from cxpmrg_lib.runs import config_hash, dataset_dir
from cxpmrg_lib.stages.decoding import describe_decoding
from cxpmrg_lib.util.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

# How each kind of system is run: the runners of runners.py and those of the mechanism systems (mechanisms.py).
RUNNERS = {**_BASE_RUNNERS, **mechanisms.RUNNERS}
# Kinds whose model reads the frozen stage-2 encoder's study tokens instead of images.
_TOKEN_KINDS = ("lm_swap", *mechanisms.TOKEN_KINDS)


TEXT_COLUMNS = {"system": str, "name": str, "protocol": str}


def read_results(path: str | Path) -> pd.DataFrame:
    """results.csv of a benchmark folder (or the file itself)."""
    path = Path(path)
    # the row hash is text: read as a number, a hash of twelve decimal digits ("116482664981") never matched
    # its row again and the row was redone at every run
    table = pd.read_csv(path / "results.csv" if path.is_dir() else path, dtype=TEXT_COLUMNS)
    if "threads" not in table:            # rows written before the benchmark ran in workers
        table["threads"] = np.nan
    return table


def _speed(fitted: _Fitted, system: System, config: BenchConfig, data: _Data) -> dict:
    """Generation reports/s and peak extra memory on the first `speed_studies` test studies."""
    from cxpmrg_lib.perf.report import PeakMemory

    n = min(config.speed_studies, len(data.test))
    if fitted.model is None:                # a constant report: nothing to run
        return {"reports_per_s": math.nan, "peak_mib": 0.0}
    if n == 0:                              # not measured (a replicate seed: BenchConfig.seed_configs)
        return {"reports_per_s": math.nan, "peak_mib": math.nan}
    if system.kind in _TOKEN_KINDS:
        studies = _FeatureSet(_stage2_tokens(config, data)["test"][:n], list(data.test.reports[:n]))
    else:
        studies = torch.utils.data.Subset(data.test, range(n))
    from cxpmrg_lib.stages.report import generate_reports

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        generate_reports(fitted.model.eval(), studies, batch_size=16, **(fitted.decoding or config.decoding()))
        seconds = time.perf_counter() - t0
    return {"reports_per_s": n / seconds, "peak_mib": mem.extra_mib}


def _score(pred_path: Path, reference_path: Path | None, config: BenchConfig) -> dict:
    from cxpmrg_lib.metrics.evaluate import evaluate_file

    against = reference_path if reference_path is not None and reference_path != pred_path else None
    result = evaluate_file(pred_path, against=against, n_boot=config.n_boot, seed=config.seed)
    row = {}
    for k, v in result["metrics"].items():
        lo, hi = (result.get("ci") or {}).get(k) or (math.nan, math.nan)
        row.update({k: v, f"{k}_lo": lo, f"{k}_hi": hi})
    if result.get("against"):
        for k, t in result["against"]["paired"].items():
            row[f"p_{k}"] = t["p_value"]
    return row


def _row_hash(protocol: dict, system: System) -> str:
    """A row is redone when the shared protocol or the system's own settings change."""
    return config_hash({**protocol, "system": system.slug, "options": dict(system.options)})


def _append_row(path: Path, row: dict) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=TEXT_COLUMNS) if path.exists() else pd.DataFrame()
    if not table.empty:
        table = table[table["system"] != row["system"]]
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    order = {slug: i for i, slug in enumerate(SYSTEMS)} | {REFERENCE: -1}   # a redone row keeps its place
    table = table.sort_values("system", key=lambda col: col.map(order).fillna(len(order)), kind="stable")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


_DATA: dict[str, _Data] = {}


def _data_for(config: BenchConfig) -> _Data:
    """The benchmark's studies, decoded once per process (a worker keeps them for its next rows, those of
    every training seed, and of two benchmarks when run_benches queues a second one)."""
    from dataclasses import replace

    key = config_hash(replace(config, seed=0).protocol())    # the studies are the same for every training seed
    if key not in _DATA:
        if len(_DATA) >= 2:
            _DATA.pop(next(iter(_DATA)))
        _DATA[key] = _load_data(config)
    return _DATA[key]


def _fit_row(config: BenchConfig, slug: str) -> dict:
    """Train (or reuse) one system and write its test predictions; its row without the scores.
    A job of its own: run_bench may run several in worker processes."""
    data = _data_for(config)
    out, system, protocol = bench_dir(config), SYSTEMS[slug], config.protocol()
    run_dir = out / slug / _row_hash(protocol, system)
    if slug in config.redo and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("benchmark: %s", system.name)
    t0 = time.perf_counter()
    fitted = RUNNERS[system.kind](system, config, data, run_dir)
    frame = pd.DataFrame({"study_id": [str(s) for s in data.test.study_ids],
                          "reference": list(data.test.reports), "prediction": fitted.predictions})
    with atomic_path(out / "predictions" / f"{slug}.csv") as tmp:
        frame.to_csv(tmp, index=False)
    row = {"system": slug, "name": system.name, "family": system.family, "paper": system.paper,
           "protocol": _row_hash(protocol, system), "n_test": len(frame)}
    measured = _speed(fitted, system, config, data)
    measured.update({"train_min": fitted.train_s / 60, "pretrain_min": fitted.pretrain_s / 60,
                     "trainable_m": fitted.trainable / 1e6, "total_m": fitted.total / 1e6,
                     "wall_min": (time.perf_counter() - t0) / 60, "threads": torch.get_num_threads(),
                     "run_dir": fitted.run_dir, "note": fitted.note,
                     "decoding": describe_decoding(fitted.decoding) if fitted.decoding else ""})
    return {"row": row, "measured": measured}


def _earlier_runs(config: BenchConfig, slugs: list[str]) -> tuple[list, list[str]]:
    """The earlier-stage runs (stages 1-2, report LMs) the systems need, each once, as calls and labels:
    trained as a first wave, so that no row waits for another row to train what both need."""
    from cxpmrg_lib.stages.report import prerequisites

    calls: dict[str, tuple] = {}

    def add(call, label: str) -> None:        # one entry per run: the stage function and its config
        calls.setdefault(f"{call.func.__qualname__}{call.args!r}", (call, label))

    for slug in slugs:
        kind, options = SYSTEMS[slug].kind, dict(SYSTEMS[slug].options)
        if kind == "mamba":
            for call in prerequisites(_mamba_config(SYSTEMS[slug], config)):
                add(call, f"{call.func.__name__} for {SYSTEMS[slug].name}")
        if kind in ("nearest", "lm_swap", "context_residual"):
            add(_stage2_call(config), "stage 2")
        if kind == "context_residual":       # the LM of the lm-llama row
            add(_report_lm_call(config, "llama", epochs=_lm_epochs(config)), "report LM (llama)")
        if kind == "r2gengpt":
            add(_report_lm_call(config, epochs=config.earlier_epochs), "report LM (llama)")
        if kind in ("lm_swap", "cvt2gpt2"):
            arch = options.get("arch", "gpt2")
            add(_report_lm_call(config, arch, epochs=_lm_epochs(config)), f"report LM ({arch})")
    return [c for c, _ in calls.values()], [label for _, label in calls.values()]


def _bench_job(configs: list[BenchConfig], task: tuple) -> tuple:
    """One job of the benchmarks' queue: an earlier-stage run (a ready-made call) or a row (_fit_row) of
    the benchmark `configs[i]`."""
    i, kind, job = task
    return i, kind, (job() if kind == "earlier" else _fit_row(configs[i], job))


def run_bench(config: BenchConfig) -> Path:
    """Run every asked-for system not yet in results.csv under this protocol; returns the bench folder.

    Systems train side by side in `config.jobs` worker processes (see cxpmrg_lib.util.parallel); each
    row is scored here and appended to results.csv as soon as it and the reference are done."""
    return run_benches([config])[0]


class _Pending:
    """One benchmark of run_benches: its folder, protocol, the rows still to fit, and the rows done before
    the reference they are tested against (scored once it is)."""

    def __init__(self, config: BenchConfig):
        self.config = config
        slugs = config.system_list()
        self.out = bench_dir(config)
        (self.out / "predictions").mkdir(parents=True, exist_ok=True)
        protocol = config.protocol()
        write_json(self.out / f"protocol_{config_hash(protocol)}.json", protocol)
        self.results = self.out / "results.csv"
        done = read_results(self.results) if self.results.exists() else pd.DataFrame(columns=["system", "protocol"])
        have = dict(zip(done["system"], done["protocol"])) if "protocol" in done else {}
        self.todo = [s for s in slugs if have.get(s) != _row_hash(protocol, SYSTEMS[s]) or s in config.redo]
        if not self.todo:
            log.info("benchmark: all %d systems already in %s", len(slugs), self.results)
        self.reference_pending = REFERENCE in self.todo
        self.waiting: list[dict] = []

    def done(self, job: dict) -> None:
        """A fitted row: scored and appended now, or kept until the reference's predictions exist."""
        if self.reference_pending and job["row"]["system"] != REFERENCE:
            self.waiting.append(job)
            return
        self.reference_pending = False
        for ready in [job] + self.waiting:
            self._finish(ready)
        self.waiting.clear()

    def _finish(self, job: dict) -> None:
        ref_path = self.out / "predictions" / f"{REFERENCE}.csv"
        pred_path = self.out / "predictions" / f"{job['row']['system']}.csv"
        row = {**job["row"], **_score(pred_path, ref_path if ref_path.exists() else None, self.config),
               **job["measured"]}
        _append_row(self.results, row)
        log.info("benchmark: %s done: BLEU-4 %.3f, CE-F1 %.3f", row["name"], row["bleu4"], row["ce_f1"])


def row_order(rows: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The queue's order of (benchmark index, slug) rows: each benchmark's reference first, then by the
    systems' place in ORDER, within one place the first row of each backbone group (System.backbone_group)
    before the rows that will load that backbone, then by benchmark and the order asked for."""
    def place(row: tuple[int, str]) -> tuple:
        return row[1] != REFERENCE, SYSTEMS[row[1]].order

    seen: set = set()
    keyed = []
    for n, row in enumerate(sorted(rows, key=lambda r: (*place(r), r[0]))):
        group = (row[0], SYSTEMS[row[1]].backbone_group)
        keyed.append(((*place(row), group in seen, n), row))
        seen.add(group)
    return [row for _, row in sorted(keyed)]


def run_benches(configs: list[BenchConfig]) -> list[Path]:
    """Several benchmarks (04_benchmark: the main dataset's and the iu-phantom's), each with all its training
    seeds (BenchConfig.seeds), in one queue of workers, the first config's `jobs` on its device; returns their
    bench folders (those of each config's first seed; seed_dirs gives all) in the same order.

    Run one after the other, the second benchmark's report LM and stage 3 wait for each other alone on a
    machine whose other core has nothing left to do (the iu-phantom took 5 of the book's minutes so);
    in one queue they fill the gaps of the first. What is trained, and every result, is that of
    run_bench on each config alone."""
    from functools import partial

    from cxpmrg_lib.util.parallel import Workers

    # Every training seed of every benchmark is a benchmark of its own (bench_dir: seed 0 in bench/, seed k in
    # bench/seed_<k>/), all in the one queue: a seed's earlier stages train beside another seed's rows.
    pending = [_Pending(c) for config in configs for c in config.seed_configs()]
    # One queue: the earlier-stage runs of every benchmark first, then the rows (each benchmark's reference
    # first, then by kind). A worker that has no earlier run left to train starts on the rows instead of
    # standing idle until the last one is done (in the default book the GPT-2 report LM of the LM swap trained
    # alone for 6.8 minutes while the other worker waited); a row that needs a run another worker is still
    # training waits for it on the run's lock, then reuses it.
    tasks, labels = [], []
    for i, p in enumerate(pending):
        calls, names = _earlier_runs(p.config, p.todo)
        tasks += [(i, "earlier", c) for c in calls]
        labels += names
    rows = row_order([(i, s) for i, p in enumerate(pending) for s in p.todo])
    tasks += [(i, "row", s) for i, s in rows]
    suffix = [""] * len(pending) if len(pending) == 1 else [_label(p.config, configs) for p in pending]
    labels += [SYSTEMS[s].name + suffix[i] for i, s in rows]
    if any(p.todo for p in pending):
        try:
            with Workers(configs[0].jobs, configs[0].device, tasks=len(tasks)) as workers:
                for _, (i, kind, job) in workers.run(partial(_bench_job, [p.config for p in pending]), tasks,
                                                     labels, desc="benchmark"):
                    if kind == "row":
                        pending[i].done(job)
        finally:
            _DATA.clear()
    return [bench_dir(c) for c in configs]


def _label(config: BenchConfig, configs: list[BenchConfig]) -> str:
    """A queue label's suffix: the dataset when the queue holds several, the seed when it holds several."""
    parts = ([dataset_dir(config.run_root, config.dataset_root, config.preset).parent.name]
             if len({c.dataset_root for c in configs}) > 1 else [])
    parts += [f"seed {config.seed}"] if any(c.seeds > 1 for c in configs) else []
    return f" ({', '.join(parts)})" if parts else ""
