"""The study table: the one DataFrame shape every data source is turned into (ARCHITECTURE.md).

Columns (STUDY_COLUMNS): `study_id` (unique str), `image_paths` (list of str, relative
to the dataset root, frontal first), `findings`, `impression`, `report` (the
generation target for that dataset's convention), `split` (train/val/test) and the
14 CheXpert labels as float (1 positive, 0 negative, -1 uncertain, NaN unknown).
Loaders may add metadata columns; nothing downstream may rely on them.

Validation says exactly what is wrong and where. With on_error="skip" the bad rows
are dropped instead, and the number dropped per reason is kept in
`df.attrs["dropped"]` and logged, so a run never shrinks silently.
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.text import is_blank
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

__all__ = ["STUDY_COLUMNS", "BASE_COLUMNS", "SPLITS", "CHEXPERT_LABELS", "validate_study_table",
           "safe_join", "check_relpath", "check_on_error", "note_dropped", "empty_study_table", "RowProblems"]

BASE_COLUMNS = ["study_id", "image_paths", "findings", "impression", "report", "split"]
STUDY_COLUMNS = BASE_COLUMNS + list(CHEXPERT_LABELS)
SPLITS = ("train", "val", "test")
_LABEL_VALUES = {1.0, 0.0, -1.0}
_MAX_EXAMPLES = 5


def check_on_error(on_error: str) -> str:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    return on_error


def note_dropped(df: pd.DataFrame, counts: dict, source: str = "") -> pd.DataFrame:
    """Add reason -> count to df.attrs["dropped"] (summing with what is there) and log it."""
    counts = {k: int(v) for k, v in counts.items() if v}
    if not counts:
        df.attrs.setdefault("dropped", {})
        return df
    dropped = dict(df.attrs.get("dropped", {}))
    for k, v in counts.items():
        dropped[k] = dropped.get(k, 0) + v
    df.attrs["dropped"] = dropped
    where = f" from {_shown(source)}" if source else ""
    said = (str(source), tuple(sorted(counts.items())))
    # Every reload of the same file drops the same rows (each split, each stage, each worker): said once
    # per process, later repeats at debug level.
    level = logging.DEBUG if said in _SAID else logging.WARNING
    _SAID.add(said)
    log.log(level, "dropped %d row(s)%s: %s", sum(counts.values()), where,
            ", ".join(f"{v} {k}" for k, v in counts.items()))
    return df


_SAID: set = set()


def _shown(source) -> str:
    """A source path as a message shows it: relative to the working folder when inside it."""
    try:
        return os.path.relpath(source) if not os.path.relpath(source).startswith("..") else str(source)
    except (TypeError, ValueError):
        return str(source)


class RowProblems:
    """Collects per-row problems, then raises one error or drops the rows (on_error)."""

    def __init__(self, on_error: str, source: str = ""):
        self.on_error = check_on_error(on_error)
        self.source = source
        self.items: list[tuple[int, str, str]] = []  # (position, reason, detail)

    def add(self, position: int, reason: str, detail: str) -> None:
        self.items.append((position, reason, detail))

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict:
        return dict(Counter(r for _, r, _ in self.items))

    def error(self) -> DataError:
        where = f"{self.source}: " if self.source else ""
        lines = "\n  ".join(f"{r}: {d}" for _, r, d in self.items[:_MAX_EXAMPLES])
        more = f"\n  ... and {len(self.items) - _MAX_EXAMPLES} more" if len(self.items) > _MAX_EXAMPLES else ""
        summary = ", ".join(f"{v} {k}" for k, v in self.counts().items())
        return DataError(f"{where}{len(self.items)} bad row(s) ({summary}):\n  {lines}{more}\n"
                         f"(pass on_error='skip' to drop them)")

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raise (on_error="raise") or return df without the bad rows, counts noted in attrs."""
        attrs = dict(df.attrs)
        if not self.items:
            df = df.reset_index(drop=True)
            df.attrs = attrs
            df.attrs.setdefault("dropped", {})
            return df
        if self.on_error == "raise":
            raise self.error()
        keep = np.ones(len(df), dtype=bool)
        keep[[i for i, _, _ in self.items]] = False
        df = df.loc[keep].reset_index(drop=True)
        df.attrs = attrs
        return note_dropped(df, self.counts(), self.source)


def check_relpath(rel, root="the dataset root") -> str:
    """The normalised relative path (posix separators), or DataError if it is absolute or escapes."""
    if isinstance(rel, os.PathLike):
        rel = os.fspath(rel)
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"empty image path {rel!r} (under {root})")
    if rel[0] in "/\\~" or rel[1:2] == ":":  # /x, \\server, ~user, C:\x, C:x
        raise DataError(f"absolute image path {rel!r} not allowed: paths must be relative to the "
                        f"dataset root {root}")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"image path {rel!r} escapes the dataset root {root}")
    return norm


def safe_join(root: str | os.PathLike, relpath: str | os.PathLike) -> Path:
    """root/relpath, refusing absolute paths and '..' that would leave root.

    Paths come from CSV and JSON files we did not write; a path such as
    ../../etc/passwd must not make the loader read outside the dataset.
    """
    return Path(root) / check_relpath(relpath, root)


def empty_study_table() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=object) for c in BASE_COLUMNS})
    for c in CHEXPERT_LABELS:
        df[c] = pd.Series(dtype=float)
    return df


def _as_path_list(v) -> list | None:
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(p) if isinstance(p, os.PathLike) else p for p in list(v)]
    if isinstance(v, os.PathLike):
        return [os.fspath(v)]
    return None


def validate_study_table(df: pd.DataFrame, root: str | os.PathLike | None = None, check_files: bool = True,
                         on_error: str = "raise", source: str = "") -> pd.DataFrame:
    """Check a study table against the contract; return a cleaned copy.

    Always an error: missing columns (all listed). Per row: an image path that is
    absolute or escapes `root`, an image file that does not exist (with
    check_files and a root), a row without images, an empty report, a split
    other than train/val/test, a label value other than 1/0/-1/NaN, a duplicate
    study_id. on_error="raise" raises one DataError that counts the problems per
    reason and names the first rows and paths; "skip" drops those rows and
    records the counts (`note_dropped`). `image_paths` become lists of str; label
    columns become float.
    """
    check_on_error(on_error)
    where = f"{source}: " if source else ""
    missing = [c for c in STUDY_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where}study table is missing column(s) {missing}")
    df = df.copy()
    df.attrs = dict(df.attrs)
    df["image_paths"] = [_as_path_list(v) for v in df["image_paths"]]
    for c in CHEXPERT_LABELS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)

    problems = RowProblems(on_error, source)
    root_str = os.fspath(root) if root is not None else None
    seen: set = set()
    label_values = df[CHEXPERT_LABELS].to_numpy(dtype=float)
    label_ok = np.isnan(label_values) | np.isin(label_values, list(_LABEL_VALUES))
    row_label_ok = label_ok.all(axis=1)
    for i, (idx, sid, paths, report, split) in enumerate(zip(df.index, df["study_id"], df["image_paths"],
                                                                df["report"], df["split"])):
        name = f"row {idx} (study_id {sid})"
        if is_blank(sid):
            problems.add(i, "missing study_id", name)
            continue
        if sid in seen:
            problems.add(i, "duplicate study_id", name)
            continue
        seen.add(sid)
        if not paths or any(not isinstance(p, str) or not p.strip() for p in paths):
            problems.add(i, "no image path", f"{name}: image_paths={paths!r}")
            continue
        bad = None
        for p in paths:
            try:
                norm = check_relpath(p, root if root is not None else "the dataset root")
            except DataError as e:
                bad = ("path escapes the dataset root", f"{name}: {e}")
                break
            if check_files and root is not None and not os.path.isfile(os.path.join(root_str, norm)):
                bad = ("missing image file", f"{name}: {os.path.join(root_str, norm)}")
                break
        if bad:
            problems.add(i, *bad)
            continue
        if is_blank(report):
            problems.add(i, "empty report", name)
            continue
        if split not in SPLITS:
            problems.add(i, "unknown split", f"{name}: split={split!r}, expected one of {SPLITS}")
            continue
        if not row_label_ok[i]:
            j = int(np.flatnonzero(~label_ok[i])[0])
            problems.add(i, "bad label value", f"{name}: {CHEXPERT_LABELS[j]}={label_values[i, j]!r}")
            continue
    return problems.apply(df)
