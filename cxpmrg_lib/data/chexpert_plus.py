"""CheXpert Plus in its native layout -> the study table.

    root/df_chexpert_plus_240401.csv        one row per image (27 columns, PAPER.md)
    root/PNG/train/patient42142/study5/view1_frontal.png
    root/chexbert_labels/findings_fixed.json, impression_fixed.json   (JSON Lines)

The CSV has one row per image; a study is the set of images in one
`<split>/patientX/studyY/` folder of the same patient, and becomes one row with
its images in `image_paths` (frontal views first). Reports are per study, so the
section text is taken from the study's first image row that has it.

There is no official test split: the release has `train` and `valid` only, so
split="official" gives train/val and no test rows. split="patient" makes a
deterministic patient-level train/val/test split instead (hash of patient id and
seed, ~70/10/20 by default); the paper's own split comes as an R2Gen
annotation.json (see r2gen.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.table import (CHEXPERT_LABELS, RowProblems, check_on_error, check_relpath, note_dropped,
                                   validate_study_table)
from cxpmrg_lib.data.text import clean_report, decode_text_counted

log = logging.getLogger(__name__)

__all__ = ["load_chexpert_plus", "find_chexpert_csv", "read_chexpert_csv", "read_chexbert_labels",
           "patient_split", "CHEXPERT_PLUS_CSV", "CHEXPERT_PLUS_COLUMNS", "REQUIRED_COLUMNS"]

CHEXPERT_PLUS_CSV = "df_chexpert_plus_240401.csv"
CHEXPERT_PLUS_COLUMNS = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
    "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
    "section_history", "section_comparison", "section_technique", "section_procedure_comments",
    "section_findings", "section_impression", "section_end_of_impression", "section_summary",
    "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
    "insurance_type", "recent_bmi", "deceased", "split",
]
REQUIRED_COLUMNS = ["path_to_image", "deid_patient_id", "split", "section_findings", "section_impression"]
_OFFICIAL_SPLITS = {"train": "train", "valid": "val", "val": "val", "validate": "val", "test": "test"}
SECTIONS = ("findings", "impression", "both")
_PROGRESS_MIN = 20000  # rows; smaller tables load in well under a second


def find_chexpert_csv(root: str | os.PathLike) -> Path:
    """root/df_chexpert_plus_240401.csv, or the newest-named df_chexpert_plus_*.csv."""
    root = Path(root)
    p = root / CHEXPERT_PLUS_CSV
    if p.is_file():
        return p
    found = sorted(root.glob("df_chexpert_plus_*.csv"))
    if found:
        return found[-1]
    raise DataError(f"no CheXpert Plus CSV in {root}: expected {p} (or another df_chexpert_plus_*.csv)")


def _read_csv_text(text_or_path, **kw) -> pd.DataFrame:
    return pd.read_csv(text_or_path, dtype=str, keep_default_na=False, na_values=[""], **kw)


def read_chexpert_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The CSV as str columns (blank -> NaN), decoded robustly.

    Strict UTF-8 first (fast path); if that fails, each line is decoded on its own
    (UTF-8, else cp1252 with replacement) and the number of such lines is kept in
    attrs["decoded_with_fallback"] and logged.
    """
    path = Path(path)
    try:
        df = _read_csv_text(path, encoding="utf-8")
        n_fallback = 0
    except UnicodeDecodeError:
        lines, n_fallback = [], 0
        for raw in path.read_bytes().split(b"\n"):
            text, fb = decode_text_counted(raw)
            n_fallback += fb
            lines.append(text)
        df = _read_csv_text(io.StringIO("\n".join(lines)))
        log.warning("%s: %d line(s) were not valid UTF-8 and were decoded as cp1252 with replacement",
                    path, n_fallback)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    df.attrs["decoded_with_fallback"] = n_fallback
    return df


def read_chexbert_labels(path: str | os.PathLike, on_error: str = "raise") -> dict[str, np.ndarray]:
    """JSON Lines {path_to_image, <14 labels>} -> {path_to_image: float array(14), NaN for null}.

    The whole file is parsed by pandas' C JSON reader when it is clean (fast on the
    real ~220k-line files); otherwise line by line, to name the bad line.
    """
    check_on_error(on_error)
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        tab = pd.read_json(io.StringIO(text), lines=True, dtype=False)
        if len(tab) and "path_to_image" in tab.columns and tab["path_to_image"].map(type).eq(str).all():
            vals = np.full((len(tab), len(CHEXPERT_LABELS)), np.nan)
            for j, k in enumerate(CHEXPERT_LABELS):
                if k in tab.columns:
                    vals[:, j] = pd.to_numeric(tab[k], errors="raise").to_numpy(dtype=float)
            return dict(zip(tab["path_to_image"].tolist(), vals))
    except (ValueError, TypeError, UnicodeDecodeError):
        pass  # find and report the bad line below
    out: dict[str, np.ndarray] = {}
    bad = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        text, _ = decode_text_counted(raw)
        try:
            obj = json.loads(text)
            key = obj["path_to_image"]
            if not isinstance(key, str):
                raise TypeError(f"path_to_image is {type(key).__name__}")
            vals = np.array([np.nan if obj.get(k) is None else float(obj[k]) for k in CHEXPERT_LABELS],
                            dtype=float)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if on_error == "raise":
                raise DataError(f"{path}, line {lineno}: not a CheXbert label record ({type(e).__name__}: {e})") from e
            bad += 1
            continue
        out[key] = vals
    if bad:
        log.warning("%s: skipped %d malformed label line(s)", path, bad)
    return out


def patient_split(patient_ids, seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> np.ndarray:
    """Deterministic patient-level split: the same patient always lands in the same split.

    Each patient id is hashed with the seed (SHA-256, so it is the same on every
    machine and Python version) to a number in [0, 1), cut at the cumulative fractions.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, not {fractions}")
    cache: dict[str, str] = {}
    cuts = np.cumsum(f)
    out = []
    for pid in patient_ids:
        s = cache.get(pid)
        if s is None:
            h = hashlib.sha256(f"{seed}:{pid}".encode("utf-8")).digest()
            u = int.from_bytes(h[:8], "big") / 2.0 ** 64
            s = "train" if u < cuts[0] else ("val" if u < cuts[1] else "test")
            cache[pid] = s
        out.append(s)
    return np.array(out, dtype=object)


def _blank_to_nan(s: pd.Series) -> pd.Series:
    s = s.astype(object)
    return s.where(s.notna() & (s.astype(str).str.strip() != ""), np.nan)


def _resolve_image(root: str, rel: str) -> tuple[str | None, list[str]]:
    """The image file for a CSV path: PNG/<path>.png, else PNG/<path>.jpg, else <path> as given."""
    stem, ext = os.path.splitext(rel)
    seen = []
    for c in (f"PNG/{stem}.png", f"PNG/{stem}{ext or '.jpg'}", rel):
        if c in seen:
            continue
        seen.append(c)
        if os.path.isfile(os.path.join(root, c)):
            return c, seen
    return None, seen


def load_chexpert_plus(root: str | os.PathLike, section: str = "findings", split: str = "official",
                       on_error: str = "raise", seed: int = 0, check_files: bool = True,
                       clean: str = "mimic", csv: str | os.PathLike | None = None,
                       split_fractions=(0.7, 0.1, 0.2)) -> pd.DataFrame:
    """Read a CheXpert Plus tree into the study table.

    section: which text is the target `report`: "findings" (the paper's choice),
    "impression", or "both" (findings then impression, each cleaned; a study needs at
    least one of them). Studies without the chosen text are dropped and counted in
    attrs["dropped"] (this is normal: many CheXpert Plus reports have no findings).
    Labels come from chexbert_labels/findings_fixed.json for "findings",
    impression_fixed.json for "impression"; for "both" from the impression file where
    it has a non-null value for the study, else from the findings file. A missing label
    file leaves the labels NaN (logged). `findings`/`impression` hold the raw section
    text, `report` the cleaned target (clean="mimic" as in the paper, "iu" or "none").

    Image paths: the CSV's .jpg path is looked up as PNG/<path>.png, then
    PNG/<path>.jpg, then <path> itself; with check_files=False the PNG path is
    assumed. Extra columns: patient_id, views, ap_pa, age, sex, source_split.
    """
    check_on_error(on_error)
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, not {section!r}")
    if split not in ("official", "patient"):
        raise ValueError(f"split must be 'official' or 'patient', not {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CheXpert Plus root {root} is not a folder")
    t0 = time.perf_counter()
    csv_path = Path(csv) if csv is not None else find_chexpert_csv(root)
    raw = read_chexpert_csv(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{csv_path} is missing required column(s) {missing} "
                        f"(found {len(raw.columns)} columns: {list(raw.columns)[:30]})")
    src = str(csv_path)

    log.debug("read CSV: %.1f s", time.perf_counter() - t0)
    # --- images: validate and locate each CSV row's file -------------------------------
    img_problems = RowProblems(on_error, src)
    root_str = os.fspath(root)
    resolved = []
    paths_iter = tqdm(raw["path_to_image"], desc="checking image paths", unit="img",
                      disable=len(raw) < _PROGRESS_MIN or None)
    for i, rel in enumerate(paths_iter):
        line = f"{csv_path.name} data row {i + 1}"  # 1-based, header not counted
        if not isinstance(rel, str) or not rel.strip():
            img_problems.add(i, "no image path", f"{line}: empty path_to_image")
            resolved.append(None)
            continue
        rel = rel.strip()
        try:
            rel = check_relpath(rel, root)
        except DataError as e:
            img_problems.add(i, "path escapes the dataset root", f"{line}: {e}")
            resolved.append(None)
            continue
        if check_files:
            found, tried = _resolve_image(root_str, rel)
            if found is None:
                img_problems.add(i, "missing image file",
                                 f"{line}: no image for {rel!r}; tried " + ", ".join(str(root / t) for t in tried))
            resolved.append(found)
        else:
            stem, _ = os.path.splitext(rel)
            resolved.append(f"PNG/{stem}.png")
    raw = raw.assign(_image=resolved)
    raw = img_problems.apply(raw)
    dropped_images = dict(raw.attrs.get("dropped", {}))
    n_fallback = raw.attrs.get("decoded_with_fallback", 0)

    log.debug("checked image paths: %.1f s", time.perf_counter() - t0)
    # --- group images into studies -----------------------------------------------------
    raw.attrs = {}  # pandas deep-copies attrs into every slice; keep grouping cheap
    raw["_dir"] = [os.path.dirname(p.strip().replace("\\", "/")) for p in raw["path_to_image"]]
    raw["_key"] = raw["deid_patient_id"].fillna("").astype(str) + "\0" + raw["_dir"]
    view = raw["frontal_lateral"] if "frontal_lateral" in raw.columns else pd.Series("", index=raw.index)
    raw["_rank"] = (~view.fillna("").astype(str).str.lower().str.startswith("frontal")).astype(int)
    for c in ("section_findings", "section_impression"):
        raw[c] = _blank_to_nan(raw[c])
    # Sort by integer codes (much faster than a multi-key sort on strings).
    key_codes = pd.factorize(raw["_key"], sort=True)[0]
    path_codes = pd.factorize(raw["path_to_image"], sort=True)[0]
    raw = raw.iloc[np.lexsort((path_codes, raw["_rank"].to_numpy(), key_codes))].reset_index(drop=True)
    keys = raw["_key"].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], dtype=int)
    bounds = list(zip(starts.tolist(), np.r_[starts[1:], len(keys)].tolist()))
    wanted = [c for c in ("deid_patient_id", "_dir", "section_findings", "section_impression", "split", "ap_pa",
                          "sex", "age") if c in raw.columns]
    first = raw[["_key", *wanted]].groupby("_key", sort=False).first()  # first non-null, frontal first
    img, key_list = raw["_image"].tolist(), raw["path_to_image"].str.strip().tolist()
    studies = pd.DataFrame({
        "patient_id": first["deid_patient_id"].to_numpy(),
        "_dir": first["_dir"].to_numpy(),
        "image_paths": [img[a:b] for a, b in bounds],
        "_keys": [key_list[a:b] for a, b in bounds],
        "findings": first["section_findings"].fillna("").str.strip().to_numpy(),
        "impression": first["section_impression"].fillna("").str.strip().to_numpy(),
        "source_split": first["split"].to_numpy(),
    })
    if "frontal_lateral" in raw.columns:
        vl = raw["frontal_lateral"].tolist()
        studies["views"] = [vl[a:b] for a, b in bounds]
    else:
        studies["views"] = [[None] * (b - a) for a, b in bounds]
    for c in ("ap_pa", "sex"):
        studies[c] = first[c].to_numpy() if c in first.columns else None
    studies["age"] = pd.to_numeric(first["age"], errors="coerce").to_numpy(dtype=float) if "age" in first.columns else np.nan
    studies["study_id"] = [d.split("/", 1)[1] if d.count("/") >= 2 else d for d in studies["_dir"]]

    log.debug("grouped studies: %.1f s", time.perf_counter() - t0)
    # --- report target, dropping studies without it ------------------------------------
    bar = dict(desc=f"cleaning {section}", unit="study", disable=len(studies) < _PROGRESS_MIN or None)
    if section == "findings":
        report = [clean_report(t, clean) for t in tqdm(studies["findings"], **bar)]
    elif section == "impression":
        report = [clean_report(t, clean) for t in tqdm(studies["impression"], **bar)]
    else:
        report = [" ".join(x for x in (clean_report(a, clean), clean_report(b, clean)) if x)
                  for a, b in tqdm(list(zip(studies["findings"], studies["impression"])), **bar)]
    studies["report"] = report
    empty = studies["report"] == ""
    n_empty = int(empty.sum())
    studies = studies.loc[~empty].reset_index(drop=True)

    log.debug("cleaned reports: %.1f s", time.perf_counter() - t0)
    # --- splits ------------------------------------------------------------------------
    if split == "official":
        studies["split"] = studies["source_split"].map(lambda s: _OFFICIAL_SPLITS.get(str(s).strip().lower(), s))
    else:
        studies["split"] = patient_split(studies["patient_id"], seed=seed, fractions=split_fractions)

    log.debug("splits: %.1f s", time.perf_counter() - t0)
    # --- labels ------------------------------------------------------------------------
    labels = np.full((len(studies), len(CHEXPERT_LABELS)), np.nan)
    sources = {"findings": ["findings"], "impression": ["impression"], "both": ["impression", "findings"]}[section]
    label_files = []
    for name in reversed(sources):  # later assignments win: impression over findings for "both"
        lp = root / "chexbert_labels" / f"{name}_fixed.json"
        if not lp.is_file():
            log.warning("no label file %s: labels from it are left NaN", lp)
            continue
        label_files.append(str(lp))
        table = read_chexbert_labels(lp, on_error=on_error)
        for r, keys in enumerate(studies["_keys"]):
            for k in keys:
                v = table.get(k.strip()) if isinstance(k, str) else None
                if v is not None:
                    if not np.isnan(v).all() or name == sources[-1]:
                        labels[r] = v
                    break
    for j, c in enumerate(CHEXPERT_LABELS):
        studies[c] = labels[:, j]

    log.debug("labels: %.1f s", time.perf_counter() - t0)
    cols = ["study_id", "image_paths", "findings", "impression", "report", "split", *CHEXPERT_LABELS,
            "patient_id", "views", "ap_pa", "age", "sex", "source_split"]
    out = studies[cols].copy()
    out.attrs = {"source": src, "kind": "chexpert_plus", "section": section, "split_mode": split,
                 "label_files": label_files, "decoded_with_fallback": n_fallback,
                 "dropped": dict(dropped_images),  # already logged when the image rows were dropped
                 "images_used": int(len(raw))}
    note_dropped(out, {f"no {section} text": n_empty}, src)
    out = validate_study_table(out, root=root, check_files=False, on_error=on_error, source=src)
    log.info("CheXpert Plus: %d studies (%s) from %s in %.1f s", len(out),
             ", ".join(f"{k} {v}" for k, v in out["split"].value_counts().items()), csv_path,
             time.perf_counter() - t0)
    return out
