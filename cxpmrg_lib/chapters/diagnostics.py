"""Why a report generator collapses onto the normal report: what its training runs recorded.

Every trained generator validates during training (stages.report.validation_fn): BLEU-4,
CE-F1, the share of distinct reports and, per observation, the share of generated reports
the labeller reads as positive beside the references' share. These functions read those
records back from the run folders. The probes of a trained model it names, a decoding sweep on the
validation studies (stages.decoding) and whether its encoder's features differ between studies at all
(stages.probe), live at the stage layer.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS
from cxpmrg_lib.runs import is_finished, read_config, read_metrics, read_summary, upstream_runs
from cxpmrg_lib.stages.decoding import SWEEP_GRID, decoding_sweep
from cxpmrg_lib.stages.probe import feature_spread

log = logging.getLogger(__name__)

__all__ = ["validation_curves", "label_rates", "decoding_sweep", "feature_spread", "SWEEP_GRID", "collapse_table",
           "language_model_table"]

def validation_curves(runs: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """One row per (system, validation step): bleu4, ce_f1, distinct and the pos:/ref: label rates.

    `runs` maps a system's name to its training run folder (the folder holding metrics.jsonl);
    systems without validation records (floors, a missing folder) are left out."""
    rows = []
    for name, run in runs.items():
        if run is None or isinstance(run, float) or not Path(run).is_dir():     # float: NaN from a CSV
            continue
        for rec in read_metrics(run):
            if "eval" in rec:
                rows.append({"system": name, "step": int(rec["step"]), **rec["eval"]})
    return pd.DataFrame(rows)


def label_rates(curves: pd.DataFrame, step: str = "last") -> pd.DataFrame:
    """(system, observation) -> predicted-positive and reference-positive rate at the last (or best-CE)
    validation step: a collapsed generator predicts 0 for every finding and 1 for No Finding."""
    if curves.empty:
        return pd.DataFrame(columns=["system", "observation", "predicted", "reference"])
    rows = []
    for system, group in curves.groupby("system", sort=False):
        pick = group.loc[group["step"].idxmax()] if step == "last" else group.loc[group["ce_f1"].idxmax()]
        for c in CHEXPERT_LABELS:
            if f"pos:{c}" in pick and pd.notna(pick[f"pos:{c}"]):
                rows.append({"system": system, "observation": c, "predicted": pick[f"pos:{c}"],
                             "reference": pick[f"ref:{c}"], "step": int(pick["step"])})
    return pd.DataFrame(rows)


def collapse_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per system: first and last validation (step, CE-F1, BLEU-4, distinct share) and the number of
    observations it ever predicts positive at the last step."""
    rows = []
    for system, group in curves.groupby("system", sort=False):
        group = group.sort_values("step")
        first, last = group.iloc[0], group.iloc[-1]
        named = sum(1 for c in CHEXPERT_LABELS if c != "No Finding" and last.get(f"pos:{c}", 0) > 0)
        rows.append({"system": system, "steps": int(last["step"]), "CE-F1 first": first["ce_f1"],
                     "CE-F1 last": last["ce_f1"], "best CE-F1": group["ce_f1"].max(),
                     "BLEU-4 last": last["bleu4"], "distinct first": first["distinct"],
                     "distinct last": last["distinct"], "findings named": named})
    return pd.DataFrame(rows).set_index("system") if rows else pd.DataFrame()


def language_model_table(runs: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """Per stage-3 run (name -> run folder): the frozen report LM it was built on (training reports, steps,
    final loss) beside the stage's own final loss. A frozen LM that has not learned the reports' language
    (a high loss) bounds what the projection and the encoder can make it write: the paper's LMs are
    pre-trained (Llama-2; Qwen1.5-1.8B for IU X-Ray), the tiny preset's is trained here on the training
    reports. Runs without a report-LM run of this project (a local pretrained LM) show blanks."""
    rows = []
    for name, run in runs.items():
        if run is None or isinstance(run, float) or not is_finished(run):
            continue
        lm = next((u for u in upstream_runs(run) if read_config(u).get("resolved", {}).get("stage") == "report_lm"
                   and is_finished(u)), None)
        lm_summary = read_summary(lm) if lm is not None else {}
        summary = read_summary(run)
        rows.append({"run": name, "LM training reports": lm_summary.get("train_reports"),
                     "LM steps": lm_summary.get("steps"), "LM final loss": lm_summary.get("final_loss"),
                     "stage-3 steps": summary.get("steps"), "stage-3 final loss": summary.get("final_loss")})
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
