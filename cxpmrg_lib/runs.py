"""The run-folder contract: where a run lives and how its files are read. The only reader of run files.

A training stage's run is `<run_root>/<dataset>/<preset>/<stage>/<config hash>/` (`run_dir_for`);
a benchmark row's is `<run_root>/<dataset>/<preset>/bench/<system>/<row hash>/`. A run folder holds

* config.yaml: {"config": the stage config's fields, "resolved": the hashed payload (its "stage", the
  data, the training settings, the upstream runs' hashes)}; written when an attempt starts;
* metrics.jsonl: one JSON object per logged step (`elapsed_s`: training seconds, resumes included)
  and per validation (`eval`); a truncated last line (a killed run) is skipped;
* train_summary.json: the trainer's record of its last session (`wall_s`, `images_per_s`, `peak_rss_mib`);
* summary.json: the stage's result, written last: its presence marks a finished run;
* checkpoints/, model/, best/: weights (the trainer's, see cxpmrg_lib.trainer.checkpoint).

The stages write these files (stages.common.start_run / finish_run, the trainer); everything else reads
them through this module.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import yaml

from cxpmrg_lib.util.errors import RunError
from cxpmrg_lib.util.fileio import read_json_if_exists

log = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "SUMMARY_FILE", "TRAIN_SUMMARY_FILE", "METRICS_FILE", "STAGE_NAMES", "config_hash",
           "dataset_dir", "run_dir_for", "read_config", "read_summary", "read_train_summary", "read_metrics",
           "is_finished", "train_seconds", "wall_seconds", "upstream_runs", "find_runs", "require_run"]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
TRAIN_SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics.jsonl"

STAGE_NAMES = {"autoregressive": "stage-1 (autoregressive)", "contrastive": "stage-2 (contrastive)",
               "report_lm": "report-LM", "finetune": "stage-3 (report generation)"}


# ----------------------------------------------------------------------------- where a run lives

def config_hash(payload: dict) -> str:
    """Twelve hex digits of the sha256 of the canonical JSON of what determines a run's result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_dir(run_root: str | os.PathLike, dataset_root: str | os.PathLike, preset: str) -> Path:
    """`<run_root>/<dataset>/<preset>`: where the runs of one dataset and preset live."""
    return Path(run_root) / (Path(dataset_root).resolve().name or "dataset") / preset


def run_dir_for(run_root: str | os.PathLike, dataset_root: str | os.PathLike, preset: str, stage: str,
                payload: dict) -> Path:
    return dataset_dir(run_root, dataset_root, preset) / stage / config_hash(payload)


# ----------------------------------------------------------------------------- reading its files

def read_config(run_dir: str | os.PathLike) -> dict:
    """config.yaml of a run ({} when empty); a broken file is a ValueError naming it."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e})") from None


def read_summary(run_dir: str | os.PathLike, missing_ok: bool = False) -> dict:
    """summary.json of a finished run. `missing_ok`: {} for an unfinished run (and a broken file is a
    ValueError naming it) instead of FileNotFoundError."""
    path = Path(run_dir) / SUMMARY_FILE
    if missing_ok:
        return read_json_if_exists(path)
    return json.loads(path.read_text())


def read_train_summary(run_dir: str | os.PathLike) -> dict:
    """train_summary.json of a run ({} when the trainer did not write one)."""
    return read_json_if_exists(Path(run_dir) / TRAIN_SUMMARY_FILE)


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).exists()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of metrics.jsonl (`run_dir` or the file itself); a truncated last line is skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.debug("skipping a malformed line of %s: %.80s", path, line)
    return rows


def train_seconds(run_dir: str | os.PathLike, missing: float | None = math.nan) -> float | None:
    """Training seconds of a run: the last `elapsed_s` of metrics.jsonl (the training loop's time,
    validation and resumes included); `missing` when no line records one (no file, validations only)."""
    seconds = []
    for row in read_metrics(run_dir):
        try:
            seconds.append(float(row["elapsed_s"]))
        except (KeyError, TypeError, ValueError):
            continue
    return max(seconds) if seconds else missing


def wall_seconds(run_dir: str | os.PathLike) -> float | None:
    """Training seconds of a run: the trainer's wall time (train_summary.json), else the last elapsed_s of
    metrics.jsonl (0.0 when its lines record none); None without either file."""
    train = read_train_summary(run_dir)
    if "wall_s" in train:
        return float(train["wall_s"])
    if not any(isinstance(row, dict) for row in read_metrics(run_dir)):
        return None
    return train_seconds(run_dir, missing=0.0)


# ----------------------------------------------------------------------------- runs and the runs they build on

def upstream_runs(run_dir: str | os.PathLike) -> Iterator[Path]:
    """The earlier-stage runs a run was built on, each once: stage 1 (a stage-2 run's
    `stage1_run`), the encoder's stage (a stage-3 run's `encoder_run`) and the report LM (its `lm` folder),
    and theirs in turn. Folders without a config.yaml (a local pretrained LM) are not runs."""
    start = Path(run_dir)
    seen, todo = set(), [start]
    while todo:
        run = todo.pop()
        if run in seen or not (run / CONFIG_FILE).exists():
            continue
        seen.add(run)
        if run != start:
            yield run
        resolved = read_config(run).get("resolved", {})
        summary = read_summary(run) if is_finished(run) else {}
        lm = resolved.get("lm")                 # stage 3: the LM folder; the LM stage itself: its config
        for ref in (summary.get("stage1_run"), str(Path(lm).parent) if isinstance(lm, str) else None):
            if ref:
                todo.append(Path(ref))
        if resolved.get("encoder_run"):
            stage = "contrastive" if resolved.get("init", "").startswith("stage2") else "autoregressive"
            home = run.parents[1]           # <run_root>/<dataset>/<preset>, or the pre-training dataset's
            if isinstance(resolved.get("pretraining"), dict) and resolved["pretraining"].get("dataset"):
                home = dataset_dir(run.parents[3], resolved["pretraining"]["dataset"], run.parents[1].name)
            todo.append(home / stage / resolved["encoder_run"])


def find_runs(run_root: str | os.PathLike) -> list[Path]:
    """Every run folder (one with a config.yaml) under a run root, sorted; checkpoints are not runs."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        return []
    return sorted(p.parent for p in run_root.rglob(CONFIG_FILE)
                  if not {"checkpoints", "model", "best"} & set(p.relative_to(run_root).parts[:-1]))


def require_run(run_dir: str | os.PathLike, stage: str, preset: str | None = None) -> Path:
    """Check that `run_dir` is a finished run of `stage` (and of `preset` when given); RunError naming it if not."""
    run_dir = Path(run_dir)
    want = STAGE_NAMES.get(stage, stage)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory (expected a finished {want} run)")
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.exists():
        raise RunError(f"{run_dir} is not a run directory of this study (no config.yaml); expected a {want} run")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    got = (cfg.get("resolved") or {}).get("stage")
    if got != stage:
        raise RunError(f"{run_dir} is a {STAGE_NAMES.get(got, got)} run, not a {want} run")
    got_preset = (cfg.get("config") or {}).get("preset")
    if preset is not None and got_preset != preset:
        raise RunError(f"{run_dir} was trained with preset {got_preset!r}, not {preset!r}: its weights do not fit")
    if not is_finished(run_dir):
        raise RunError(f"{run_dir} is an unfinished {want} run (no summary.json): run the stage again with the "
                       "same settings to resume it from its last checkpoint")
    return run_dir
