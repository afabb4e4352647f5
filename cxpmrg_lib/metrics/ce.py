"""Clinical efficacy (CE): precision/recall/F1 of the 14 CheXpert observations, three conventions.

The field reports CE in three incompatible ways (PAPER.md), so every number here is named
by its convention:

* ``r2gen`` (default, what CXPMRG-Bench reports): a label is positive only when it is 1.0;
  uncertain (-1) and not mentioned (NaN) are negative. Micro and macro P/R/F1 over the 14
  labels with scikit-learn's semantics and zero_division=0 (a 0/0 ratio is 0; macro F1 is
  the mean of per-label F1, not the F1 of the mean P and R).
* ``example`` (PromptMRG): per report tp/fp/fn over the 14 labels (positive = 1.0);
  P = mean tp/(tp+fp), R = mean tp/(tp+fn), F1 = mean tp/(tp+(fp+fn)/2), each 0/0 -> 0.
* ``uncertain_positive`` (ViLMedic/RadEval): 1.0 and -1.0 are positive; micro/macro over
  all 14 labels and over TOP5_LABELS.

Everything is computed from per-study counts (`ce_stats`), so the bootstrap resamples
studies by summing those counts (`ce_from_sums`) and never relabels a report.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS, TOP5_LABELS

__all__ = ["CONVENTIONS", "CE_KEYS", "CE_HEADLINE_KEYS", "label_values", "ce_stats", "ce_from_sums",
           "ce_from_labels", "ce_per_label", "ce_scores", "headline_keys"]

CONVENTIONS = ("r2gen", "example", "uncertain_positive")
_PRF = ("precision", "recall", "f1")
_L = len(CHEXPERT_LABELS)
_TOP5 = np.array([CHEXPERT_LABELS.index(x) for x in TOP5_LABELS])

# Stable key names, in the order they are reported.
CE_HEADLINE_KEYS = ("ce_precision", "ce_recall", "ce_f1")
CE_KEYS = (
    *CE_HEADLINE_KEYS,
    *(f"ce_r2gen_{avg}_{m}" for avg in ("micro", "macro") for m in _PRF),
    *(f"ce_example_{m}" for m in _PRF),
    *(f"ce_unc_{avg}_{m}" for avg in ("micro", "macro", "top5_micro", "top5_macro") for m in _PRF),
)
# Which detailed keys the headline ce_precision/ce_recall/ce_f1 copy, per convention.
_HEADLINE = {"r2gen": "ce_r2gen_micro_", "example": "ce_example_", "uncertain_positive": "ce_unc_micro_"}
_PREFIX = {"r2gen": "ce_r2gen_", "example": "ce_example_", "uncertain_positive": "ce_unc_"}

# Columns of the per-study statistics matrix (n x 87).
_R2, _UNC, _EX = slice(0, 3 * _L), slice(3 * _L, 6 * _L), slice(6 * _L, 6 * _L + 3)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CE convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


def headline_keys(convention: str) -> dict[str, str]:
    """ce_precision/ce_recall/ce_f1 -> the detailed key each copies under `convention`."""
    _check_convention(convention)
    return {f"ce_{m}": _HEADLINE[convention] + m for m in _PRF}


def label_values(frame: pd.DataFrame, name: str = "labels") -> np.ndarray:
    """The 14 label columns as an (n x 14) float array; checks columns and values."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name}: expected a DataFrame with the 14 CheXpert columns, got {type(frame).__name__}")
    missing = [c for c in CHEXPERT_LABELS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing label columns {missing}")
    raw = frame[CHEXPERT_LABELS]
    vals = raw.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isnan(vals) | np.isin(vals, (1.0, 0.0, -1.0))) | (np.isnan(vals) & raw.notna().to_numpy())
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{name}: label values must be 1, 0, -1 or NaN; {int(bad.sum())} are not, e.g. row "
                         f"{frame.index[r]!r} column {CHEXPERT_LABELS[c]!r} is {raw.iat[r, c]!s}")
    return vals


def _aligned(ref_labels: pd.DataFrame, pred_labels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Both frames as arrays, rows matched by index (study) when the indexes differ only in order."""
    if len(ref_labels) != len(pred_labels):
        raise ValueError(f"ref_labels has {len(ref_labels)} rows, pred_labels {len(pred_labels)}")
    if not ref_labels.index.equals(pred_labels.index):
        a, b = set(ref_labels.index), set(pred_labels.index)
        if a != b or ref_labels.index.has_duplicates or pred_labels.index.has_duplicates:
            only = sorted(map(str, a ^ b))[:5]
            raise ValueError(f"ref_labels and pred_labels are indexed by different studies "
                             f"({len(a ^ b)} differ, e.g. {only}); index both by study_id")
        pred_labels = pred_labels.loc[ref_labels.index]
    return label_values(ref_labels, "ref_labels"), label_values(pred_labels, "pred_labels")


def ce_stats(ref_vals: np.ndarray, pred_vals: np.ndarray) -> np.ndarray:
    """Per-study sufficient statistics (n x 87): tp/fp/fn per label for r2gen and for
    uncertain-positive positives, then the example-based P, R, F1 of the study."""
    cols = []
    for pos in (lambda v: v == 1.0, lambda v: (v == 1.0) | (v == -1.0)):
        t, p = pos(ref_vals), pos(pred_vals)
        cols += [t & p, ~t & p, t & ~p]  # tp, fp, fn  (each n x 14)
    tp, fp, fn = (c.sum(axis=1).astype(np.float64) for c in cols[:3])
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = np.stack([tp / (tp + fp), tp / (tp + fn), tp / (tp + (fp + fn) / 2)], axis=1)
    ex = np.nan_to_num(ex, nan=0.0)
    return np.concatenate([*(c.astype(np.float64) for c in cols), ex], axis=1)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def _prf(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def _micro_macro(counts: np.ndarray, labels=slice(None)) -> dict[str, np.ndarray]:
    """counts: (m x 42) summed tp|fp|fn per label -> micro and macro P/R/F1 (each (m,))."""
    tp, fp, fn = (counts[:, i * _L:(i + 1) * _L][:, labels] for i in range(3))
    out = dict(zip((f"micro_{m}" for m in _PRF), _prf(tp.sum(1), fp.sum(1), fn.sum(1))))
    out.update(zip((f"macro_{m}" for m in _PRF), (x.mean(1) for x in _prf(tp, fp, fn))))
    return out


def ce_from_sums(sums: np.ndarray, n: int, convention: str = "r2gen") -> dict[str, np.ndarray]:
    """Every CE_KEYS value for each row of summed statistics (m x 87) over `n` studies."""
    sums = np.atleast_2d(sums)
    out = {f"ce_r2gen_{k}": v for k, v in _micro_macro(sums[:, _R2]).items()}
    for i, m in enumerate(_PRF):
        out[f"ce_example_{m}"] = sums[:, _EX][:, i] / n
    out.update({f"ce_unc_{k}": v for k, v in _micro_macro(sums[:, _UNC]).items()})
    out.update({f"ce_unc_top5_{k}": v for k, v in _micro_macro(sums[:, _UNC], _TOP5).items()})
    for head, key in headline_keys(convention).items():
        out[head] = out[key]
    return {k: out[k] for k in CE_KEYS}


def ce_from_labels(ref_labels: pd.DataFrame, pred_labels: pd.DataFrame, convention: str = "r2gen") -> dict:
    """CE under one convention from label frames (14 CHEXPERT_LABELS columns, 1/0/-1/NaN).

    Returns precision/recall/f1 (the convention's headline: micro for r2gen and
    uncertain_positive) and the convention's detailed keys without the ``ce_<conv>_``
    prefix (micro_f1, macro_f1, top5_micro_f1, ...). Rows are matched by index.
    """
    _check_convention(convention)
    ref, pred = _aligned(ref_labels, pred_labels)
    if len(ref) == 0:
        raise ValueError("no studies to score")
    allv = ce_from_sums(ce_stats(ref, pred).sum(0), len(ref), convention)
    out = {m: float(allv[f"ce_{m}"][0]) for m in _PRF}
    prefix = _PREFIX[convention]
    out.update({k[len(prefix):]: float(v[0]) for k, v in allv.items() if k.startswith(prefix)})
    return out


def ce_per_label(ref_labels: pd.DataFrame, pred_labels: pd.DataFrame, convention: str = "r2gen") -> pd.DataFrame:
    """Per-label table: tp, fp, fn, support (reference positives), precision, recall, f1.

    ``example`` uses the r2gen positives (1.0 only); ``uncertain_positive`` counts -1 too.
    """
    _check_convention(convention)
    ref, pred = _aligned(ref_labels, pred_labels)
    stats = ce_stats(ref, pred).sum(0)
    block = stats[_UNC] if convention == "uncertain_positive" else stats[_R2]
    tp, fp, fn = block[:_L], block[_L:2 * _L], block[2 * _L:]
    p, r, f = _prf(tp, fp, fn)
    table = pd.DataFrame({"tp": tp, "fp": fp, "fn": fn, "support": tp + fn, "precision": p,
                          "recall": r, "f1": f}, index=pd.Index(CHEXPERT_LABELS, name="label"))
    return table.astype({"tp": int, "fp": int, "fn": int, "support": int})


def default_labeler() -> Callable[[Sequence[str]], pd.DataFrame]:
    """cxpmrg_lib.labels.labeler.label_reports, imported only when CE is asked for."""
    try:
        from cxpmrg_lib.labels.labeler import label_reports
    except ImportError as e:
        raise ImportError("CE metrics need cxpmrg_lib.labels.labeler.label_reports (not importable: "
                          f"{e}); pass labeler=callable or precomputed label frames") from e
    return label_reports


def label_texts(texts: Sequence, labeler=None, name: str = "texts") -> pd.DataFrame:
    """Label report texts (missing cells -> "") and check the labeller's output shape."""
    from cxpmrg_lib.metrics.nlg import as_text

    labeler = labeler or default_labeler()
    frame = labeler([as_text(t) for t in texts])
    if not isinstance(frame, pd.DataFrame) or len(frame) != len(texts):
        raise ValueError(f"the labeller returned {type(frame).__name__} with "
                         f"{len(frame) if hasattr(frame, '__len__') else '?'} rows for {len(texts)} {name}")
    label_values(frame, f"labels of {name}")
    return frame.reset_index(drop=True)


def ce_scores(references: Sequence, predictions: Sequence, convention: str = "r2gen", labeler=None) -> dict:
    """Label both sides (default: cxpmrg_lib.labels.labeler.label_reports) and score them (`ce_from_labels`)."""
    _check_convention(convention)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    return ce_from_labels(label_texts(references, labeler, "references"),
                          label_texts(predictions, labeler, "predictions"), convention)
