"""R2Gen-style annotation.json trees (IU X-Ray, MIMIC-CXR, the paper's CheXpert Plus split).

    root/annotation.json   {"train": [...], "val": [...], "test": [...]}
                           item: {"id", "report", "image_path": [relative paths], "split"}
    root/images/...        the images, paths relative to this folder (R2Gen convention)
    root/labels.csv        optional: study_id (or id) + any of the 14 CheXpert label columns

R2Gen's items carry one report with no section split: it becomes `findings` (raw)
and `report` (cleaned); `impression` is "". The split is the list an item sits
in, so an item's own "split" field is not needed. Labels are NaN unless labels.csv
(or `labels=`) gives them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.table import CHEXPERT_LABELS, RowProblems, check_on_error, safe_join, validate_study_table
from cxpmrg_lib.data.text import clean_report, decode_text_counted, is_blank

log = logging.getLogger(__name__)

__all__ = ["load_r2gen", "read_annotation", "guess_r2gen_dataset", "R2GEN_DATASETS"]

R2GEN_DATASETS = ("iu_xray", "mimic_cxr", "chexpert_plus")
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_annotation(path: str | os.PathLike) -> dict:
    """The parsed annotation.json; a DataError gives the JSON error's line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    text, fallback = decode_text_counted(path.read_bytes())
    if fallback:
        log.warning("%s is not valid UTF-8; decoded as cp1252 with replacement", path)
    try:
        ann = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}") from e
    if not isinstance(ann, dict):
        raise DataError(f"{path}: expected a JSON object with train/val/test lists, got {type(ann).__name__}")
    unknown = [k for k in ann if k not in _SPLIT_NAMES]
    if unknown or not ann:
        raise DataError(f"{path}: top-level keys must be train/val/test, found {list(ann)}")
    for k, v in ann.items():
        if not isinstance(v, list):
            raise DataError(f"{path}: '{k}' must be a list of items, got {type(v).__name__}")
    ann = dict(ann)
    ann["_fallback"] = fallback
    return ann


def guess_r2gen_dataset(items: list[dict]) -> str:
    """iu_xray / mimic_cxr / chexpert_plus from what the ids and image paths look like."""
    paths = [p for it in items[:200] if isinstance(it, dict) for p in (it.get("image_path") or [])
             if isinstance(p, str)]
    ids = [str(it.get("id", "")) for it in items[:200] if isinstance(it, dict)]
    if any(re.search(r"patient\d+/study\d+", p) for p in paths):
        return "chexpert_plus"
    if any(re.match(r"(files/)?p\d\d/p\d+/s\d+", p) for p in paths):
        return "mimic_cxr"
    if any(i.upper().startswith("CXR") for i in ids) or any(p.upper().startswith("CXR") for p in paths):
        return "iu_xray"
    n = [len(it.get("image_path") or []) for it in items[:200] if isinstance(it, dict)]
    return "iu_xray" if n and np.mean(n) >= 1.5 else "mimic_cxr"


def _read_labels(path: Path) -> pd.DataFrame:
    try:
        lab = pd.read_csv(path, dtype={"study_id": str, "id": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable label CSV ({e})") from e
    key = "study_id" if "study_id" in lab.columns else ("id" if "id" in lab.columns else None)
    if key is None:
        raise DataError(f"{path}: a label CSV needs a 'study_id' (or 'id') column; found {list(lab.columns)}")
    cols = [c for c in CHEXPERT_LABELS if c in lab.columns]
    if not cols:
        raise DataError(f"{path}: none of the 14 CheXpert label columns found; found {list(lab.columns)}")
    if lab[key].duplicated().any():
        raise DataError(f"{path}: duplicate ids, e.g. {lab[key][lab[key].duplicated()].iloc[0]!r}")
    return lab.rename(columns={key: "study_id"}).set_index("study_id")[cols].apply(pd.to_numeric, errors="coerce")


def load_r2gen(root: str | os.PathLike, annotation: str | os.PathLike = "annotation.json", dataset: str = "auto",
               clean: str | None = None, on_error: str = "raise", check_files: bool = True,
               images_dir: str = "images", labels: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read an R2Gen annotation tree into the study table.

    dataset: "iu_xray", "mimic_cxr", "chexpert_plus" or "auto" (guessed from ids and
    paths; recorded in attrs["dataset"]). clean: None picks R2Gen's rule for the
    dataset ("iu" for IU X-Ray, "mimic" otherwise). image_paths are relative to
    `root` (so they start with `images_dir`). labels: a CSV of study_id + label
    columns; None uses root/labels.csv when it exists.
    """
    check_on_error(on_error)
    root = Path(root)
    ann_path = Path(annotation) if Path(annotation).is_absolute() else root / annotation
    t0 = time.perf_counter()
    ann = read_annotation(ann_path)
    fallback = ann.pop("_fallback")
    src = str(ann_path)
    all_items = [it for v in ann.values() for it in v]
    if dataset == "auto":
        dataset = guess_r2gen_dataset(all_items)
    elif dataset not in R2GEN_DATASETS:
        raise ValueError(f"dataset must be 'auto' or one of {R2GEN_DATASETS}, not {dataset!r}")
    style = clean if clean is not None else ("iu" if dataset == "iu_xray" else "mimic")
    img_root = safe_join(root, images_dir) if images_dir not in ("", ".") else root

    rows, records = [], []
    for key, items in ann.items():
        for j, it in enumerate(items):
            records.append((_SPLIT_NAMES[key], f"{ann_path.name} {key}[{j}]", it))
    problems = RowProblems(on_error, src)
    for pos, (split, where, it) in enumerate(records):
        row = {"study_id": None, "image_paths": None, "findings": "", "impression": "", "report": "",
               "split": split}
        rows.append(row)
        if not isinstance(it, dict) or "id" not in it or "image_path" not in it:
            problems.add(pos, "malformed item", f"{where}: expected an object with id, report, image_path; "
                                                f"got {str(it)[:80]!r}")
            continue
        sid = str(it["id"])
        where = f"{where} (id {sid})"
        row["study_id"] = sid
        paths = it["image_path"]
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
            problems.add(pos, "no image path", f"{where}: image_path={it['image_path']!r}")
            continue
        rel = []
        bad = None
        for p in paths:
            try:
                full = safe_join(img_root, p)
            except DataError as e:
                bad = ("path escapes the dataset root", f"{where}: {e}")
                break
            if check_files and not full.is_file():
                bad = ("missing image file", f"{where}: {full}")
                break
            rel.append(full.relative_to(root).as_posix())
        if bad:
            problems.add(pos, *bad)
            continue
        row["image_paths"] = rel
        report = it.get("report")
        if isinstance(report, bytes):
            report = decode_text_counted(report)[0]
        if is_blank(report):
            problems.add(pos, "empty report", where)
            continue
        row["findings"] = str(report).strip()
        row["report"] = clean_report(report, style)
        if not row["report"]:
            problems.add(pos, "empty report", f"{where}: nothing left after cleaning {str(report)[:60]!r}")
    df = pd.DataFrame(rows, columns=["study_id", "image_paths", "findings", "impression", "report", "split"])
    df = problems.apply(df)
    dropped = df.attrs.get("dropped", {})
    for c in CHEXPERT_LABELS:
        df[c] = np.nan
    label_path = Path(labels) if labels is not None else (root / "labels.csv")
    if labels is not None and not label_path.is_file():
        raise DataError(f"label file not found: {label_path}")
    if label_path.is_file():
        lab = _read_labels(label_path)
        idx = lab.reindex(df["study_id"])
        for c in lab.columns:
            df[c] = idx[c].to_numpy(dtype=float)
        n_missing = int(idx.isna().all(axis=1).sum())
        if n_missing:
            log.warning("%s: no labels for %d of %d studies (left NaN)", label_path, n_missing, len(df))
    df.attrs = {"source": src, "kind": "r2gen", "dataset": dataset, "clean": style,
                "label_file": str(label_path) if label_path.is_file() else None,
                "decoded_with_fallback": int(fallback), "dropped": dict(dropped)}  # logged by RowProblems
    out = validate_study_table(df, root=root, check_files=False, on_error=on_error, source=src)
    log.info("R2Gen %s: %d studies (%s) from %s in %.1f s", dataset, len(out),
             ", ".join(f"{k} {v}" for k, v in out["split"].value_counts().items()), ann_path,
             time.perf_counter() - t0)
    return out
