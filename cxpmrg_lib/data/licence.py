"""What of a dataset may go into the published book: the per-tree decision (the book shows it: chapters.publish).

CheXpert Plus and MIMIC-CXR are shared under data use agreements that forbid
redistribution (data_manifests/*.yaml: `redistributable: false`). A book built on
them must show aggregates only (metrics, counts, curves, label frequencies), never a
radiograph or a sentence of a report, unless whoever runs the code opts in for a
private copy (`-p publish_restricted True`). The decision is made per dataset tree:

* a tree-local `dataset_manifest.json` (written by the phantom generators, or put
  there by hand) decides, whatever the tree looks like;
* a phantom tree (phantom_truth.csv + a SYNTHETIC README) and an iu-phantom tree
  (annotation.json + mesh_mapping.json) may be published;
* a CheXpert Plus tree may not; an R2Gen tree is what `guess_r2gen_dataset` says
  (IU X-Ray may be published under CC BY-NC-ND 4.0 with attribution; MIMIC-CXR and
  CheXpert Plus may not);
* anything else may not (the safe default).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["PublishPolicy", "policy", "identify", "manifest", "OPT_IN", "MANIFEST_DIR"]

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "data_manifests"
OPT_IN = "-p publish_restricted True"

# Used when data_manifests/ is not beside the package (an installed wheel): the same verdicts.
_FALLBACK = {
    "phantom": {"name": "phantom (synthetic CheXpert Plus)", "redistributable": True,
                "licence": "same as this project (MIT)"},
    "iu_phantom": {"name": "iu-phantom (real IU X-Ray reports, rendered radiographs)", "redistributable": True,
                   "licence": "reports CC BY-NC-ND 4.0 (Indiana University / Open-i); rendered images MIT"},
    "iu_xray": {"name": "IU X-Ray (Open-i, Indiana University Chest X-ray Collection)", "redistributable": True,
                "licence": "CC BY-NC-ND 4.0 (stated in every report XML)"},
    "chexpert_plus": {"name": "CheXpert Plus", "redistributable": False,
                      "licence": "Stanford University School of Medicine CheXpert Plus Dataset Research Use Agreement"},
    "mimic_cxr": {"name": "MIMIC-CXR (R2Gen annotation)", "redistributable": False,
                  "licence": "PhysioNet Credentialed Health Data License 1.5.0"},
    "unknown": {"name": "an unrecognised dataset", "redistributable": False, "licence": "unknown"},
}


@dataclass(frozen=True)
class PublishPolicy:
    """What the book may show of one dataset tree."""
    dataset: str            # manifest key: phantom, iu_phantom, iu_xray, chexpert_plus, mimic_cxr, unknown
    name: str
    redistributable: bool
    allowed: bool           # redistributable, or the reader opted in (allow_restricted)
    licence: str
    reason: str             # how the dataset was recognised
    citation: str = ""
    root: str = ""

    @property
    def restricted_but_shown(self) -> bool:
        return self.allowed and not self.redistributable


@lru_cache(maxsize=None)
def _manifests(folder: str) -> dict:
    import yaml

    out = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            log.warning("%s: unreadable manifest (%s); using the built-in facts", path, e)
            continue
        out[path.stem] = data
    return out


def manifest(dataset: str) -> dict:
    """name, licence, citation, redistributable of a dataset: its data_manifests/*.yaml, else built in."""
    facts = dict(_FALLBACK.get(dataset, _FALLBACK["unknown"]))
    facts.update({k: v for k, v in _manifests(str(MANIFEST_DIR)).get(dataset, {}).items()
                  if k in ("name", "licence", "citation", "redistributable", "source")})
    facts["redistributable"] = bool(facts.get("redistributable", False))
    return facts


def _marker(root: Path) -> dict | None:
    from cxpmrg_lib.data.phantom import DATASET_MARKER

    path = root / DATASET_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable dataset marker ({e}); fix or delete it") from e
    if not isinstance(data, dict) or not isinstance(data.get("redistributable"), bool):
        raise ValueError(f"{path}: a dataset marker needs \"redistributable\": true or false; found {data!r}")
    return data


def _is_phantom(root: Path) -> bool:
    readme = root / "README.txt"
    return ((root / "phantom_truth.csv").is_file() and readme.is_file()
            and readme.read_text(errors="replace").startswith("SYNTHETIC DATA"))


def _r2gen_dataset(root: Path) -> str:
    from cxpmrg_lib.data.r2gen import guess_r2gen_dataset, read_annotation

    ann = read_annotation(root / "annotation.json")
    ann.pop("_fallback", None)
    return guess_r2gen_dataset([it for items in ann.values() for it in items])


def identify(dataset_root: str | os.PathLike, dataset_kind: str = "auto") -> tuple[str, str, dict]:
    """(dataset key, how it was recognised, marker facts or {}) for a dataset tree."""
    from cxpmrg_lib.data.check import detect_kind
    from cxpmrg_lib.util.errors import DataError

    root = Path(dataset_root)
    if root.is_dir():
        marker = _marker(root)
        if marker is not None:
            return str(marker.get("dataset") or "unknown"), "its dataset_manifest.json", marker
        if _is_phantom(root):
            return "phantom", "phantom_truth.csv and a SYNTHETIC README (a phantom tree)", {}
        if (root / "annotation.json").is_file() and (root / "mesh_mapping.json").is_file():
            return "iu_phantom", "annotation.json with mesh_mapping.json (an iu-phantom tree)", {}
    try:
        kind = detect_kind(root) if dataset_kind == "auto" else dataset_kind
    except DataError as e:
        return "unknown", f"not recognised ({e})", {}
    if kind == "chexpert_plus":
        return "chexpert_plus", "df_chexpert_plus_*.csv without phantom files (CheXpert Plus)", {}
    if kind == "openi":
        return "iu_xray", "Open-i report archive (IU X-Ray)", {}
    if kind == "r2gen":
        try:
            guess = _r2gen_dataset(root if root.is_dir() else root.parent)
        except DataError as e:
            return "unknown", f"an unreadable annotation.json ({e})", {}
        return guess, f"R2Gen annotation.json whose ids and paths look like {guess}", {}
    return "unknown", f"dataset kind {kind!r}", {}


def policy(dataset_root: str | os.PathLike, dataset_kind: str = "auto",
           allow_restricted: bool = False) -> PublishPolicy:
    """May images and report text of this tree go into the book? See the module docstring."""
    dataset, reason, marker = identify(dataset_root, dataset_kind)
    facts = manifest(dataset)
    if marker:
        facts.update({k: marker[k] for k in ("name", "licence", "citation", "redistributable") if k in marker})
    redistributable = bool(facts["redistributable"])
    allowed = redistributable or bool(allow_restricted)
    pol = PublishPolicy(dataset=dataset, name=str(facts.get("name", dataset)), redistributable=redistributable,
                        allowed=allowed, licence=str(facts.get("licence", "unknown")), reason=reason,
                        citation=" ".join(str(facts.get("citation", "")).split()), root=str(dataset_root))
    if pol.restricted_but_shown:
        log.warning("%s may not be redistributed (%s); images and report text are shown because "
                    "publish_restricted is set: keep this copy private", pol.name, pol.licence)
    elif not allowed:
        log.info("%s may not be redistributed; only aggregates will be shown", pol.name)
    return pol
