"""The released MambaXray-VL checkpoints scored under this study's protocol (`cxpmrg evaluate-released`).

The released stage-3 model (`models.released_report`: stage-2 + stage-3 files and a local LLM) writes a report
for every study of one split of a dataset tree, read from its image files with the released preprocessing (RGB,
224 px bicubic, the Swin processor's normalisation; a study's views, at most two, averaged as the released code
does). The reports are scored by `metrics.evaluate.evaluate_file`, the scorer of `cxpmrg evaluate` and of every
benchmark row: the full suite with percentile-bootstrap 95% CIs.

Decoding follows the released scripts by profile: "default" (MIMIC-CXR, CheXpert Plus: beam 3, 80-120 new
tokens) or "iu" (IU X-Ray: beam 5, 40-100), both with repetition and length penalty 2.0; "auto" takes "iu"
for an R2Gen tree the loader reads as IU X-Ray (`attrs["dataset"] == "iu_xray"`), else "default".

The output folder has a benchmark row's layout: `predictions/<system>.csv` (study_id, reference, prediction),
`predictions/<system>.metrics.json` and a one-row `results.csv` (each metric with `_lo`/`_hi`). Nothing is lost
on a crash: the reports so far are rewritten atomically to `predictions/<system>.partial.csv` after every batch,
and a run with the same settings (`predictions/<system>.settings.json`) resumes from them.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.util.fileio import atomic_path, read_json_if_exists, write_json
from cxpmrg_lib.util.progress import tqdm

__all__ = ["ReleasedEvalConfig", "evaluate_released", "released_decoding", "SYSTEM"]

log = logging.getLogger(__name__)

SYSTEM = "mambaxray-vl-released"
PROFILES = ("auto", "default", "iu")
_COLUMNS = ["study_id", "reference", "prediction"]


@dataclass
class ReleasedEvalConfig:
    """What `evaluate_released` scores, and how. `decoding` overrides the profile's settings (transformers'
    generate options: num_beams, min_new_tokens, max_new_tokens, ...). `lm_dtype` "auto": float16 on a GPU (as
    the released code runs its LLM), float32 on the CPU."""
    stage3: str | os.PathLike
    llm_dir: str | os.PathLike
    dataset_root: str | os.PathLike
    stage2: str | os.PathLike | None = None
    out: str | os.PathLike = "runs/released"
    kind: str = "auto"
    split: str = "test"
    limit: int | None = None
    device: str = "auto"
    profile: str = "auto"
    decoding: dict = field(default_factory=dict)
    batch_size: int = 4
    lm_dtype: str = "auto"
    n_boot: int = 1000
    seed: int = 0
    meteor: bool = True
    system: str = SYSTEM


def released_decoding(profile: str, dataset: str | None = None, overrides: dict | None = None) -> tuple[str, dict]:
    """(the profile used, its decoding with `overrides`): "auto" is "iu" for an IU X-Ray tree, else "default"."""
    from cxpmrg_lib.models.released_report import IU_DECODING, RELEASED_DECODING

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
    if profile == "auto":
        profile = "iu" if dataset == "iu_xray" else "default"
    base = IU_DECODING if profile == "iu" else RELEASED_DECODING
    return profile, {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device here (use cpu or auto)")
    return torch.device(name)


def _file_id(path) -> dict | None:
    """A checkpoint named by its resolved path, size and modification time (a replaced file starts afresh)."""
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat() if p.exists() else None
    return {"path": str(p), "bytes": st.st_size if st else None, "mtime": int(st.st_mtime) if st else None}


def _read_partial(path: Path, ids: list[str]) -> pd.DataFrame:
    """The reports of an interrupted run, those of studies still asked for (in the split's order)."""
    if not path.exists():
        return pd.DataFrame(columns=_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable (%s); starting over", path, e)
        return pd.DataFrame(columns=_COLUMNS)
    if list(frame.columns) != _COLUMNS:
        log.warning("%s: columns %s, not %s; starting over", path, list(frame.columns), _COLUMNS)
        return pd.DataFrame(columns=_COLUMNS)
    wanted = set(ids)
    return frame[frame["study_id"].isin(wanted)].drop_duplicates("study_id").reset_index(drop=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _batch_views(model, root: Path, rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 3, S, S) views of the studies `rows` (at most the model's max_images each) and their (B, M) mask."""
    from cxpmrg_lib.data.table import safe_join

    views = []
    for row in rows:
        paths = [safe_join(root, p) for p in list(row.image_paths)[: model.max_images]]
        if not paths:
            raise DataError(f"{root}: study {row.study_id} has no image")
        try:
            views.append(model.load_views(paths)[0][0])          # (M, 3, S, S)
        except (OSError, ValueError) as e:
            raise DataError(f"{root}: study {row.study_id}: cannot read its images "
                            f"({', '.join(map(str, paths))}): {e}") from None
    m = max(v.shape[0] for v in views)
    images = torch.zeros(len(views), m, *views[0].shape[1:])
    mask = torch.zeros(len(views), m, dtype=torch.bool)
    for i, v in enumerate(views):
        images[i, : v.shape[0]], mask[i, : v.shape[0]] = v, True
    return images, mask


def evaluate_released(config: ReleasedEvalConfig) -> dict:
    """Generate the reports of `config.split` with the released model, score them, write the row's files;
    return {"out", "predictions", "metrics" (evaluate_file's result), "row" (the results.csv row), "profile",
    "decoding"}."""
    from cxpmrg_lib.metrics.evaluate import evaluate_file
    from cxpmrg_lib.models.released_report import check_causal_lm_dir, load_released_report_model
    from cxpmrg_lib.stages.decoding import describe_decoding
    from cxpmrg_lib.stages.studies import DEFAULT_LOADER, split_table

    root = Path(config.dataset_root)
    check_causal_lm_dir(config.llm_dir)
    for f in (config.stage3, config.stage2):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"no released checkpoint at {f}")
    table = split_table(root, config.split, config.kind, config.limit, DEFAULT_LOADER)
    profile, decoding = released_decoding(config.profile, table.attrs.get("dataset"), config.decoding)
    device = _device(config.device)
    lm_dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}[config.lm_dtype]
    ids = [str(s) for s in table["study_id"]]
    refs = dict(zip(ids, table["report"]))

    pred_dir = Path(config.out) / "predictions"
    final, partial = pred_dir / f"{config.system}.csv", pred_dir / f"{config.system}.partial.csv"
    settings_path = pred_dir / f"{config.system}.settings.json"
    settings = {"stage3": _file_id(config.stage3), "stage2": _file_id(config.stage2),
                "llm_dir": str(Path(config.llm_dir).resolve()), "dataset_root": str(root.resolve()),
                "kind": config.kind, "split": config.split, "limit": config.limit, "profile": profile,
                "decoding": decoding, "lm_dtype": str(lm_dtype).replace("torch.", "")}
    same = read_json_if_exists(settings_path) == settings
    if not same:
        for stale in (final, partial):
            if stale.exists():
                log.info("%s was written with other settings: generating afresh", stale)
                stale.unlink()
        write_json(settings_path, settings)

    done = _read_partial(final if final.exists() else partial, ids)
    have = set(done["study_id"])
    todo = table[~table["study_id"].astype(str).isin(have)]
    wall, generated = 0.0, 0
    if len(todo):
        log.info("released model: %s (%s profile: %s, %d-%d new tokens) on %s, %d of %d studies to generate%s",
                 Path(config.stage3).name, profile, describe_decoding(decoding), decoding.get("min_new_tokens", 0),
                 decoding.get("max_new_tokens", 0), device, len(todo), len(ids),
                 f" (resuming after {len(have)})" if have else "")
        model = load_released_report_model(config.stage3, config.llm_dir, stage2=config.stage2, lm_dtype=lm_dtype)
        model.to(device)
        frames = [done]
        rows = list(todo.itertuples(index=False))
        bar = tqdm(total=len(ids), initial=len(have), desc="released reports", unit="study")
        t0 = time.perf_counter()
        for start in range(0, len(rows), max(1, config.batch_size)):
            chunk = rows[start: start + max(1, config.batch_size)]
            images, mask = _batch_views(model, root, chunk)
            reports = model.generate(images.to(device), mask.to(device), **decoding)
            frames.append(pd.DataFrame({"study_id": [str(r.study_id) for r in chunk],
                                        "reference": [r.report for r in chunk], "prediction": reports}))
            _write_csv(pd.concat(frames, ignore_index=True), partial)
            bar.update(len(chunk))
        wall, generated = time.perf_counter() - t0, len(rows)
        bar.close()
        done = pd.concat(frames, ignore_index=True)
    order = {s: i for i, s in enumerate(ids)}
    done = done.assign(reference=done["study_id"].map(refs))
    done = done.sort_values("study_id", key=lambda c: c.map(order)).reset_index(drop=True)[_COLUMNS]
    _write_csv(done, final)
    if partial.exists():
        partial.unlink()

    result = evaluate_file(final, meteor=config.meteor, n_boot=config.n_boot, seed=config.seed)
    row = {"system": config.system, "name": "MambaXray-VL (released checkpoints)", "family": "Mamba + LLM",
           "paper": "CXPMRG-Bench (CVPR 2025)", "n_test": len(done), "profile": profile,
           "decoding": (f"{describe_decoding(decoding)}, {decoding.get('min_new_tokens', 0)}-"
                        f"{decoding.get('max_new_tokens', 0)} new tokens, lp {decoding.get('length_penalty', 1.0):g}"),
           "stage3": Path(config.stage3).name, "device": str(device), "lm_dtype": settings["lm_dtype"]}
    for k, v in result["metrics"].items():
        lo, hi = (result.get("ci") or {}).get(k) or (math.nan, math.nan)
        row.update({k: v, f"{k}_lo": lo, f"{k}_hi": hi})
    if generated:
        row.update({"reports_per_s": generated / wall if wall else math.nan, "wall_min": wall / 60})
    _write_csv(pd.DataFrame([row]), Path(config.out) / "results.csv")
    return {"out": Path(config.out), "predictions": final, "metrics": result, "row": row, "profile": profile,
            "decoding": decoding}
