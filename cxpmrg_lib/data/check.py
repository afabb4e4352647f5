"""`cxpmrg data check ROOT`: what a dataset folder holds and what is wrong with it.

The check loads the tree with on_error="skip", so it reports every problem with a
count instead of stopping at the first, and decodes a sample of images (decoding
every image of a full dataset takes long; verify_images=-1 does it anyway).
"""
from __future__ import annotations

import logging
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

__all__ = ["detect_kind", "check_tree", "format_check", "loader_options", "KINDS"]

KINDS = ("chexpert_plus", "r2gen", "openi")


def detect_kind(root: str | os.PathLike) -> str:
    """'chexpert_plus' (df_chexpert_plus_*.csv), 'r2gen' (annotation.json) or 'openi' (a .tgz of reports)."""
    root = Path(root)
    if root.is_file():
        if root.name.endswith((".tgz", ".tar.gz")):
            return "openi"
        if root.suffix == ".json":
            return "r2gen"
        raise DataError(f"{root} is a file but not an Open-i .tgz or an annotation .json")
    if not root.is_dir():
        raise DataError(f"{root} does not exist")
    if any(root.glob("df_chexpert_plus_*.csv")):
        return "chexpert_plus"
    if (root / "annotation.json").is_file():
        return "r2gen"
    if (root / "NLMCXR_reports.tgz").is_file():
        return "openi"
    raise DataError(f"cannot tell what dataset {root} is: expected df_chexpert_plus_*.csv (CheXpert Plus), "
                    f"annotation.json (R2Gen: IU X-Ray, MIMIC-CXR) or NLMCXR_reports.tgz (Open-i)")


def loader_options(kind: str, opts: dict) -> dict:
    """opts without those that only the *other* loader takes (logged).

    Notebooks and the CLI pass CheXpert Plus options (section, split, seed) whatever
    the tree; an R2Gen tree has no sections and a fixed split, so they do not apply
    there and dropping them changes nothing. A name neither loader knows is kept,
    so that the loader rejects it as a typo.
    """
    import inspect

    from cxpmrg_lib.data.chexpert_plus import load_chexpert_plus
    from cxpmrg_lib.data.r2gen import load_r2gen

    own = {"chexpert_plus": load_chexpert_plus, "r2gen": load_r2gen}.get(kind)
    if own is None:
        return dict(opts)
    other = load_r2gen if kind == "chexpert_plus" else load_chexpert_plus
    mine, theirs = set(inspect.signature(own).parameters), set(inspect.signature(other).parameters)
    dropped = sorted(k for k in opts if k not in mine and k in theirs)
    if dropped:
        log.info("options %s do not apply to a %s tree; ignored", dropped, kind)
    return {k: v for k, v in opts.items() if k not in dropped}


def _length_stats(texts) -> dict:
    # words, not the " . " sentence marks of cleaned reports
    n = np.array([sum(1 for w in t.split() if any(ch.isalnum() for ch in w)) for t in texts if isinstance(t, str)],
                 dtype=float)
    if n.size == 0:
        return {"n": 0}
    return {"n": int(n.size), "mean_words": round(float(n.mean()), 1), "median_words": float(np.median(n)),
            "p95_words": float(np.percentile(n, 95)), "min_words": int(n.min()), "max_words": int(n.max())}


def _verify_images(df: pd.DataFrame, root: Path, verify_images: int, seed: int) -> tuple[int, list]:
    from cxpmrg_lib.data.images import ImageLoadError, load_image

    paths = [p for ps in df["image_paths"] for p in ps]
    if verify_images >= 0 and len(paths) > verify_images:
        paths = random.Random(seed).sample(paths, verify_images)
    bad = []
    for p in tqdm(paths, desc="decoding images", disable=len(paths) < 500):
        try:
            load_image(root / p)
        except ImageLoadError as e:
            bad.append(str(e))
    return len(paths), bad


def check_tree(root: str | os.PathLike, kind: str = "auto", verify_images: int = 100, seed: int = 0,
               **opts) -> dict:
    """Summary of a dataset folder: studies per split, images, label prevalence, report lengths, problems.

    opts go to the loader (e.g. section="impression" for CheXpert Plus). Problems are
    [{"problem", "count", "examples"}]; the tree is usable as is when the list is empty.
    "fatal" is True when training on the tree would fail: no usable study, or an
    image that cannot be decoded (the data loader would stop on it).
    """
    root = Path(root)
    kind = detect_kind(root) if kind == "auto" else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, not {kind!r}")
    problems: list[dict] = []
    if kind == "openi":
        from cxpmrg_lib.data.openi import load_openi_reports

        tgz = root if root.is_file() else root / "NLMCXR_reports.tgz"
        df = load_openi_reports(tgz, on_error="skip")
        if df.attrs["skipped"]:
            problems.append({"problem": "malformed report XML", "count": len(df.attrs["skipped"]),
                             "examples": [f"{m}: {r}" for m, r in df.attrs["skipped"][:3]]})
        if df.attrs["decoded_with_fallback"]:
            problems.append({"problem": "not valid UTF-8 (decoded as cp1252)",
                             "count": len(df.attrs["decoded_with_fallback"]),
                             "examples": df.attrs["decoded_with_fallback"][:3]})
        return {"kind": "openi", "root": str(tgz), "studies": {"all": int(len(df))},
                "images": int(df["image_ids"].map(len).sum()),
                "images_per_study": {int(k): int(v) for k, v in sorted(Counter(df["image_ids"].map(len)).items())},
                "with_findings": int((df["findings"] != "").sum()),
                "with_impression": int((df["impression"] != "").sum()),
                "report_length": _length_stats(df["findings"][df["findings"] != ""]),
                "label_prevalence": {}, "problems": problems, "fatal": len(df) == 0}

    if kind == "chexpert_plus":
        from cxpmrg_lib.data.chexpert_plus import load_chexpert_plus
        df = load_chexpert_plus(root, on_error="skip", **loader_options(kind, opts))
    else:
        from cxpmrg_lib.data.r2gen import load_r2gen
        df = load_r2gen(root, on_error="skip", **loader_options(kind, opts))
    for reason, n in df.attrs.get("dropped", {}).items():
        problems.append({"problem": f"dropped: {reason}", "count": int(n), "examples": []})
    if df.attrs.get("decoded_with_fallback"):
        problems.append({"problem": "text not valid UTF-8 (decoded as cp1252)",
                         "count": int(df.attrs["decoded_with_fallback"]), "examples": []})
    n_checked, bad = _verify_images(df, root, verify_images, seed) if len(df) else (0, [])
    if bad:
        problems.append({"problem": f"unreadable image (in a sample of {n_checked})", "count": len(bad),
                         "examples": bad[:3]})
    labels = df[CHEXPERT_LABELS]
    known = labels.notna().any(axis=1)
    prevalence = {c: round(float((labels[c] == 1.0).mean()), 4) for c in CHEXPERT_LABELS} if known.any() else {}
    n_img = df["image_paths"].map(len)
    split_order = ["train", "val", "test"]
    counts = df["split"].value_counts()
    return {"kind": kind, "root": str(root), "dataset": df.attrs.get("dataset", kind),
            "studies": {s: int(counts.get(s, 0)) for s in split_order},
            "images": int(n_img.sum()),
            "images_per_study": {int(k): int(v) for k, v in sorted(Counter(n_img).items())},
            "images_decoded": n_checked,
            "studies_with_labels": int(known.sum()),
            "label_prevalence": prevalence,
            "report_length": _length_stats(df["report"]),
            "problems": problems, "fatal": len(df) == 0 or bool(bad)}


def format_check(report: dict) -> str:
    """The check_tree dict as a short plain-text report."""
    lines = [f"{report['kind']} at {report['root']}"]
    if report.get("dataset") and report["dataset"] != report["kind"]:
        lines[0] += f" (dataset: {report['dataset']})"
    lines.append("studies: " + ", ".join(f"{k} {v:,}" for k, v in report["studies"].items())
                 + f" (total {sum(report['studies'].values()):,})")
    ips = ", ".join(f"{k}: {v:,}" for k, v in report.get("images_per_study", {}).items())
    lines.append(f"images: {report['images']:,} (studies by image count: {ips})")
    for key in ("with_findings", "with_impression", "images_decoded", "studies_with_labels"):
        if key in report:
            lines.append(f"{key.replace('_', ' ')}: {report[key]:,}")
    rl = report.get("report_length", {})
    if rl.get("n"):
        lines.append(f"report length (words): mean {rl['mean_words']}, median {rl['median_words']:g}, "
                     f"p95 {rl['p95_words']:g}, range {rl['min_words']}-{rl['max_words']}")
    if report.get("label_prevalence"):
        lines.append("label prevalence (fraction positive):")
        width = max(len(k) for k in report["label_prevalence"])
        for k, v in report["label_prevalence"].items():
            lines.append(f"  {k:<{width}}  {v:.3f}")
    elif report["kind"] != "openi":
        lines.append("labels: none (all NaN)")
    if report["problems"]:
        lines.append("problems:")
        for p in report["problems"]:
            lines.append(f"  {p['count']:,} x {p['problem']}")
            for ex in p.get("examples", []):
                lines.append(f"      e.g. {ex}")
    else:
        lines.append("problems: none")
    if report.get("fatal"):
        lines.append("FATAL: this tree cannot be used as is (no usable study, or undecodable images)")
    return "\n".join(lines)
