"""Decoding: the reports a trained generator writes for a dataset, and the validation sweep over
decoding settings (search, repetition penalty, no-repeat n-gram size) that says how much of a
collapse onto one report decoding explains."""
from __future__ import annotations

import itertools
from typing import Mapping

import pandas as pd
import torch

from cxpmrg_lib.data.dataset import collate_studies
from cxpmrg_lib.metrics.suite import report_scores
from cxpmrg_lib.util.progress import tqdm

__all__ = ["generate_reports", "decoding_sweep", "SWEEP_GRID"]

# The validation decoding sweep: search x repetition penalty x no-repeat n-gram size.
SWEEP_GRID = {"num_beams": (1, 3), "repetition_penalty": (1.0, 1.3, 2.0), "no_repeat_ngram_size": (0, 3)}


@torch.no_grad()
def generate_reports(model, studies, batch_size: int = 16, **decoding) -> list[str]:
    """Reports for every study of a dataset (items as StudyTensorDataset's), in order."""
    device = next(p for p in model.parameters()).device
    out: list[str] = []
    for start in tqdm(range(0, len(studies), batch_size), desc="generate", unit="batch", leave=False):
        batch = collate_studies([studies[i] for i in range(start, min(start + batch_size, len(studies)))])
        out += model.generate(batch["image"].to(device), batch["image_mask"].to(device), **decoding)
    return out


def decoding_sweep(model, studies, grid: Mapping[str, tuple] = SWEEP_GRID, batch_size: int = 16) -> pd.DataFrame:
    """BLEU-4, CE-F1 and the share of distinct reports of `model` on `studies` for every decoding setting
    of `grid` (validation studies: the test split is never used to choose decoding)."""
    keys = list(grid)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    references = list(studies.reports)
    rows = []
    for setting in tqdm(settings, desc="decoding sweep", unit="setting"):
        preds = generate_reports(model, studies, batch_size=batch_size, **setting)
        rows.append({**setting, **report_scores(references, preds)})
    return pd.DataFrame(rows)
