"""R2Gen's IU X-Ray split: the 296 validation and 590 test studies of Chen et al. (EMNLP 2020).

The ids are reference data, not code: `data_manifests/iu_split/{valid,test}.csv` in the
repository (from ReXrank's public split files, MIT licence; see the README there), found
beside the package as the other manifests are, or in the folder `$CXPMRG_IU_SPLIT` names
(an installed package without the repository's data_manifests/). Open-i reports map to
them through the XML file number: R2Gen's `CXR<N>_IM-...` is Open-i's `ecgen-radiology/<N>.xml`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from cxpmrg_lib.util.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["IU_SPLIT_ENV", "IU_SPLIT_DIR", "R2GEN_IU_COUNTS", "find_iu_split", "load_iu_split", "openi_number",
           "r2gen_study_id"]

IU_SPLIT_ENV = "CXPMRG_IU_SPLIT"
IU_SPLIT_DIR = Path(__file__).resolve().parents[2] / "data_manifests" / "iu_split"
R2GEN_IU_COUNTS = {"val": 296, "test": 590}
_FILES = {"val": "valid.csv", "test": "test.csv"}
_COLUMNS = ["study_id", "openi_xml", "split", "n_images"]


def find_iu_split(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding valid.csv and test.csv: `folder`, else $CXPMRG_IU_SPLIT, else data_manifests/iu_split."""
    where = "the folder given"
    if folder is None:
        env = os.environ.get(IU_SPLIT_ENV)
        folder, where = (env, f"${IU_SPLIT_ENV}") if env else (IU_SPLIT_DIR, "the repository's data_manifests/")
    folder = Path(folder).expanduser()
    missing = [f for f in _FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"R2Gen's IU X-Ray split is not in {folder} ({where}): {', '.join(missing)} missing. "
                        f"It ships in the repository as data_manifests/iu_split/; outside a checkout set "
                        f"{IU_SPLIT_ENV}=/path/to/iu_split")
    return folder


def openi_number(name: str) -> int:
    """The report number of an Open-i XML name ("ecgen-radiology/38.xml" or "38.xml" -> 38)."""
    m = re.search(r"(\d+)\.xml$", str(name).strip(), flags=re.IGNORECASE)
    if not m:
        raise DataError(f"not an Open-i report file name: {name!r} (expected <N>.xml)")
    return int(m.group(1))


def r2gen_study_id(image_ids: list[str]) -> str:
    """R2Gen's id of an Open-i study: its first image id without the last "-NNNN"
    (CXR2056_IM-0694-1001-0001 -> CXR2056_IM-0694-1001); true of all 886 val/test studies."""
    if not image_ids:
        raise ValueError("a study without images has no R2Gen id")
    return re.sub(r"-\d+$", "", str(image_ids[0]).strip())


def load_iu_split(folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """R2Gen's validation and test studies: study_id, openi_xml, split ("val"/"test"), n_images, and
    `number` (the Open-i report number). Checked: the columns, the splits, no id in two rows."""
    folder = find_iu_split(folder)
    parts = []
    for split, name in _FILES.items():
        path = folder / name
        try:
            t = pd.read_csv(path, dtype={"study_id": str, "openi_xml": str, "split": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable split CSV ({e})") from e
        lacking = [c for c in _COLUMNS if c not in t.columns]
        if lacking:
            raise DataError(f"{path}: no column {lacking[0]!r} (has {list(t.columns)})")
        wrong = t[t["split"] != split]
        if len(wrong):
            raise DataError(f"{path}, row {int(wrong.index[0]) + 2}: split {wrong['split'].iloc[0]!r}, expected {split!r}")
        parts.append(t[_COLUMNS])
    df = pd.concat(parts, ignore_index=True)
    df["number"] = [openi_number(x) for x in df["openi_xml"]]
    for col in ("study_id", "number"):
        dup = df[col][df[col].duplicated()]
        if len(dup):
            raise DataError(f"{folder}: {col} {dup.iloc[0]!r} is listed twice in R2Gen's IU X-Ray split")
    return df
