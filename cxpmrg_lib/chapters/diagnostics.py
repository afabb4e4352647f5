"""Why a report generator collapses onto the normal report: what its training runs recorded.

Every trained generator validates during training (stages.report.validation_fn): BLEU-4,
CE-F1, the share of distinct reports and, per observation, the share of generated reports
the labeller reads as positive beside the references' share. These functions read those
records back from the run folders and probe a trained model: a decoding sweep on the
validation studies, and whether its encoder's features differ between studies at all.
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from cxpmrg_lib.data.observations import CHEXPERT_LABELS
from cxpmrg_lib.trainer import read_metrics

log = logging.getLogger(__name__)

__all__ = ["validation_curves", "label_rates", "decoding_sweep", "feature_spread", "SWEEP_GRID", "collapse_table"]

# The validation decoding sweep: search x repetition penalty x no-repeat n-gram size.
SWEEP_GRID = {"num_beams": (1, 3), "repetition_penalty": (1.0, 1.3, 2.0), "no_repeat_ngram_size": (0, 3)}


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


def decoding_sweep(model, studies, grid: Mapping[str, tuple] = SWEEP_GRID, batch_size: int = 16) -> pd.DataFrame:
    """BLEU-4, CE-F1 and the share of distinct reports of `model` on `studies` for every decoding setting
    of `grid` (validation studies: the test split is never used to choose decoding)."""
    from cxpmrg_lib.metrics import report_scores
    from cxpmrg_lib.util.progress import tqdm
    from cxpmrg_lib.stages.report import generate_reports

    keys = list(grid)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    references = list(studies.reports)
    rows = []
    for setting in tqdm(settings, desc="decoding sweep", unit="setting"):
        preds = generate_reports(model, studies, batch_size=batch_size, **setting)
        rows.append({**setting, **report_scores(references, preds)})
    return pd.DataFrame(rows)


@torch.no_grad()
def feature_spread(encode, studies, batch_size: int = 32) -> dict:
    """Do a model's image features differ between studies? `encode(images, image_mask)` -> (B, T, D)
    memory (or a tuple whose first item is). Returns the between-study standard deviation of the pooled
    features relative to their mean norm, and the mean cosine similarity of two different studies'
    pooled features: a spread near 0 (cosine near 1) means the decoder is given the same input for
    every image, and no training of the decoder can make it follow the image."""
    from cxpmrg_lib.data.dataset import collate_studies

    pooled = []
    for start in range(0, len(studies), batch_size):
        batch = collate_studies([studies[i] for i in range(start, min(start + batch_size, len(studies)))])
        memory = encode(batch["image"], batch["image_mask"])
        memory = memory[0] if isinstance(memory, tuple) else memory
        pooled.append(memory.float().mean(1))
    x = torch.cat(pooled)
    spread = float(x.std(0).norm() / x.mean(0).norm().clamp_min(1e-12)) if len(x) > 1 else 0.0
    unit = torch.nn.functional.normalize(x, dim=1)
    sim = unit @ unit.T
    n = len(x)
    off = float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))
    return {"studies": n, "between_study_spread": spread, "mean_cosine_between_studies": off}
