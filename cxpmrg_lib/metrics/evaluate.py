"""`cxpmrg evaluate`: score a predictions CSV, with bootstrap CIs and an optional paired test.

The CSV has one row per study with columns ``study_id, reference, prediction`` (others
are ignored). Cells are read as text, so a number in a report cell is scored as its
text; an empty prediction cell is scored as an empty report and counted
(``n_empty_predictions``); an empty reference, an empty or duplicate study_id, or a
missing column is a DataError naming the file and the rows. With ``against`` a second
CSV of the same studies (same ids, same references, any row order) is scored on the
same bootstrap resamples and compared with a paired test. The result is written next
to the predictions as ``<name>.metrics.json`` (atomically).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pandas as pd

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.util.fileio import write_json
from cxpmrg_lib.metrics import (CE_HEADLINE_KEYS, METRIC_KEYS, NLG_KEYS, ce_per_label, compare_stats,
                                normalize_text, study_stats)

log = logging.getLogger(__name__)

__all__ = ["REQUIRED_COLUMNS", "PAIRED_KEYS", "read_predictions", "evaluate_file", "format_evaluation",
           "metrics_json_path"]

REQUIRED_COLUMNS = ("study_id", "reference", "prediction")
# The metrics the paired test reports (the headline ones; the JSON has the same).
PAIRED_KEYS = (*NLG_KEYS, *CE_HEADLINE_KEYS)
_SHOW = 5  # how many offending ids an error message lists


def _ids(values) -> str:
    values = list(values)
    more = f", ... ({len(values) - _SHOW} more)" if len(values) > _SHOW else ""
    return ", ".join(map(repr, values[:_SHOW])) + more


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """The CSV as a frame (study_id, reference, prediction as text; prediction NaN when empty)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)} "
                        f"and needs {list(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise DataError(f"{path}: no rows to evaluate")
    frame = frame[list(REQUIRED_COLUMNS)].copy()
    frame["study_id"] = frame["study_id"].fillna("").str.strip()
    no_id = frame.index[frame["study_id"] == ""]
    if len(no_id):
        raise DataError(f"{path}: {len(no_id)} row(s) without a study_id (CSV lines {_ids(no_id + 2)})")
    dup = frame["study_id"][frame["study_id"].duplicated(keep=False)]
    if len(dup):
        uniq = dup.unique()
        raise DataError(f"{path}: {len(uniq)} study_id value(s) appear more than once "
                        f"({len(dup)} rows): {_ids(uniq)}")
    no_ref = frame["study_id"][frame["reference"].map(normalize_text) == ""]
    if len(no_ref):
        raise DataError(f"{path}: {len(no_ref)} study/studies with an empty reference: {_ids(no_ref)}")
    return frame.reset_index(drop=True)


def metrics_json_path(path: str | os.PathLike) -> Path:
    """preds.csv -> preds.metrics.json in the same folder."""
    path = Path(path)
    return path.with_name(f"{path.stem}.metrics.json")


def _match(a: pd.DataFrame, b: pd.DataFrame, path_a: Path, path_b: Path) -> pd.DataFrame:
    """B's rows in A's study order; the same studies and references are required."""
    ids_a, ids_b = set(a["study_id"]), set(b["study_id"])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise DataError(f"a paired test needs the same studies in both files: {len(only_a)} study_id(s) "
                        f"only in {path_a} ({_ids(only_a)}), {len(only_b)} only in {path_b} ({_ids(only_b)}); "
                        f"{len(ids_a & ids_b)} shared")
    b = b.set_index("study_id").loc[a["study_id"]].reset_index()
    ref_a = a["reference"].map(normalize_text)
    ref_b = b["reference"].map(normalize_text)
    differ = a["study_id"][ref_a.to_numpy() != ref_b.to_numpy()]
    if len(differ):
        raise DataError(f"{path_a} and {path_b} have different references for {len(differ)} "
                        f"study/studies: {_ids(differ)}")
    return b


def _clean(obj):
    """NaN -> None (JSON has no NaN), tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def evaluate_file(path: str | os.PathLike, against: str | os.PathLike | None = None, meteor: bool = True,
                  n_boot: int = 1000, convention: str = "r2gen", seed: int = 0, alpha: float = 0.05,
                  method: str = "bootstrap", labeler=None, write: bool = True) -> dict:
    """Score `path` (and compare with `against`); write `<name>.metrics.json`; return the result.

    n_boot resamples give the (1 - alpha) percentile CIs and, with `against`, the paired
    test (method "bootstrap" or "permutation", two-sided) on the same number of resamples.
    n_boot=0 skips the CIs (and is refused together with `against`). `labeler` replaces
    cxpmrg_lib.labels.labeler.label_reports (tests); write=False returns without writing the JSON.
    """
    path = Path(path)
    if n_boot < 0 or (against is not None and n_boot < 1):
        raise ValueError(f"n_boot must be >= 1 for CIs/paired tests (0 skips CIs), got {n_boot}")
    frame = read_predictions(path)
    log.info("scoring %d studies from %s", len(frame), path)
    st = study_stats(frame["reference"].tolist(), frame["prediction"].tolist(), meteor=meteor,
                     convention=convention, labeler=labeler)
    ci = st.bootstrap_ci(n_boot, seed, alpha) if n_boot else {}
    per_label = ce_per_label(st.ref_labels, st.pred_labels, convention)
    result = {
        "file": str(path), "n_studies": st.n, "n_empty_predictions": st.info["n_empty_predictions"],
        "meteor_computed": st.info["meteor_computed"], "convention": convention, "notes": list(st.info["notes"]),
        "n_boot": n_boot, "seed": seed, "alpha": alpha,
        "metrics": {k: st.values[k] for k in METRIC_KEYS},
        "ci": {k: list(v) for k, v in ci.items()},
        "per_label": per_label.reset_index().to_dict(orient="records"),
        "against": None,
    }
    if against is not None:
        against = Path(against)
        other = _match(frame, read_predictions(against), path, against)
        st_b = study_stats(frame["reference"].tolist(), other["prediction"].tolist(), meteor=meteor,
                           convention=convention, labeler=labeler, ref_labels=st.ref_labels)
        paired = compare_stats(st, st_b, PAIRED_KEYS, n_boot, method, seed, alpha)
        result["against"] = {"file": str(against), "n_empty_predictions": st_b.info["n_empty_predictions"],
                             "method": method, "metrics": {k: st_b.values[k] for k in METRIC_KEYS},
                             "paired": paired}
    result = _clean(result)
    if write:
        out = metrics_json_path(path)
        write_json(out, result)
        result["output"] = str(out)
        log.info("wrote %s", out)
    return result


def _num(x, width: int = 8) -> str:
    return f"{'n/a':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{width}.4f}"


def format_evaluation(result: dict) -> str:
    """A printable table: metric, value, CI; then the paired-test lines when present."""
    pct = round(100 * (1 - result.get("alpha", 0.05)))
    head = (f"{result['file']}: {result['n_studies']} studies, {result['n_empty_predictions']} empty "
            f"prediction(s); CE convention {result['convention']}")
    lines = [head]
    lines += [f"note: {n}" for n in result.get("notes", [])]
    ci = result.get("ci") or {}
    if ci:
        lines.append(f"{pct}% CIs: percentile bootstrap over studies, {result['n_boot']} resamples, seed {result['seed']}")
    lines.append(f"{'metric':<28}{'value':>8}   {f'{pct}% CI' if ci else ''}")
    for key, value in result["metrics"].items():
        lo_hi = ci.get(key)
        interval = "" if not lo_hi else ("n/a" if lo_hi[0] is None or lo_hi[0] != lo_hi[0]
                                         else f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]")
        lines.append(f"{key:<28}{_num(value)}   {interval}")
    other = result.get("against")
    if other:
        lines.append("")
        lines.append(f"paired {other['method']} test, A = {result['file']}, B = {other['file']} "
                     f"({result['n_boot']} resamples, two-sided; delta = A - B)")
        lines.append(f"{'metric':<14}{'A':>8}{'B':>8}{'delta':>9}{'p':>8}   verdict")
        for key, t in other["paired"].items():
            if t["p_value"] is None:
                verdict = "not computed"
            elif t["p_value"] < result.get("alpha", 0.05):
                verdict = "A better" if t["delta"] > 0 else "B better"
            else:
                verdict = "no significant difference"
            lines.append(f"{key:<14}{_num(t['value_a'])}{_num(t['value_b'])}{_num(t['delta'], 9)}"
                         f"{_num(t['p_value'])}   {verdict}")
    if result.get("output"):
        lines.append(f"\nwrote {result['output']}")
    return "\n".join(lines)
