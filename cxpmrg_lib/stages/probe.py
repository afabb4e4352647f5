"""Linear probes: how much of the 14 labels a frozen encoder's pooled features carry.

A logistic regression per label on pooled features of the train split, scored by
AUROC on the test split. Used to check that stage 1 learned something a random
encoder of the same shape does not have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

__all__ = ["extract_features", "probe_auroc", "ProbeResult"]


@dataclass
class ProbeResult:
    per_label: pd.DataFrame      # label, auroc, positives_train, positives_test
    mean_auroc: float            # over the labels with both classes in train and test


@torch.no_grad()
def extract_features(encode, images: Dataset, batch_size: int = 64, desc: str = "features") -> np.ndarray:
    """Pooled features (N, dim) of every image; `encode` maps a (B, 1, S, S) batch to (B, dim)."""
    out = []
    for batch in tqdm(DataLoader(images, batch_size=batch_size), desc=desc, unit="batch", leave=False):
        out.append(encode(batch).float().cpu().numpy())
    return np.concatenate(out)


def probe_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                labels: list[str] = CHEXPERT_LABELS, c: float = 1.0, seed: int = 0) -> ProbeResult:
    """One logistic regression per label (positive = 1.0; uncertain, negative and blank = 0)."""
    scaler = StandardScaler().fit(train_x)
    xtr, xte = scaler.transform(train_x), scaler.transform(test_x)
    ytr, yte = np.nan_to_num(train_y) == 1.0, np.nan_to_num(test_y) == 1.0
    rows = []
    for j, label in enumerate(labels):
        row = {"label": label, "positives_train": int(ytr[:, j].sum()), "positives_test": int(yte[:, j].sum()),
               "auroc": float("nan")}
        if 0 < ytr[:, j].sum() < len(ytr) and 0 < yte[:, j].sum() < len(yte):
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xtr, ytr[:, j])
            row["auroc"] = float(roc_auc_score(yte[:, j], clf.decision_function(xte)))
        rows.append(row)
    table = pd.DataFrame(rows)
    scored = table["auroc"].dropna()
    if scored.empty:
        log.warning("no label has both classes in train and test; the probe scores nothing")
    return ProbeResult(per_label=table, mean_auroc=float(scored.mean()) if len(scored) else float("nan"))


def probe_autoregressive(run_dir, dataset_root, kind: str = "auto", loader: dict | None = None,
                         limit: int | None = None, seed: int = 0, test_split: str = "test") -> dict[str, ProbeResult]:
    """The linear probe on a stage-1 encoder and on a randomly initialised one of the same shape."""
    from cxpmrg_lib.models.arm import ARMPretrainer
    from cxpmrg_lib.stages.studies import load_split
    from cxpmrg_lib.stages import load_autoregressive

    trained = load_autoregressive(run_dir)
    torch.manual_seed(seed)
    random_init = ARMPretrainer(trained.config).eval()
    size = trained.config.encoder.image_size
    train_images, train_table = load_split(dataset_root, size, "train", kind, limit, loader)
    test_images, test_table = load_split(dataset_root, size, test_split, kind, limit, loader)
    ytr = train_table[CHEXPERT_LABELS].to_numpy(dtype=float)
    yte = test_table[CHEXPERT_LABELS].to_numpy(dtype=float)
    results = {}
    for name, model in (("stage 1 (autoregressive)", trained), ("random init", random_init)):
        xtr = extract_features(model.encode, train_images, desc=f"{name}: train features")
        xte = extract_features(model.encode, test_images, desc=f"{name}: test features")
        results[name] = probe_auroc(xtr, ytr, xte, yte, seed=seed)
        log.info("probe %s: mean AUROC %.3f", name, results[name].mean_auroc)
    return results


def probe_table(results: dict[str, ProbeResult]) -> pd.DataFrame:
    """One row per encoder: mean AUROC and how many labels it was scored on."""
    return pd.DataFrame([{"encoder": name, "mean AUROC": round(r.mean_auroc, 4),
                          "labels scored": int(r.per_label["auroc"].notna().sum())}
                         for name, r in results.items()]).set_index("encoder")


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
