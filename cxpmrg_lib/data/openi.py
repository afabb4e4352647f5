"""Open-i / IU X-Ray reports (NLMCXR_reports.tgz): real report text and human MeSH indexing.

The archive holds 3,955 XML files `ecgen-radiology/N.xml`, one per study, with the
report sections as `<AbstractText Label=...>`, human MeSH terms (`<MeSH><major>`)
and the names of the study's images (`<parentImage id=...>`). The reports are
CC BY-NC-ND 4.0 (stated in every XML). We read them straight from the tgz (no
extraction), because the only copy most users have is the one `torchxrayvision`
ships as package data.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.text import decode_text_counted

log = logging.getLogger(__name__)

__all__ = ["MeshTerm", "parse_mesh_term", "find_openi_reports", "load_openi_reports", "iter_openi_reports",
           "OPENI_ENV", "OPENI_COLUMNS"]

OPENI_ENV = "CXPMRG_OPENI_TGZ"
OPENI_COLUMNS = ["uid", "xml_name", "comparison", "indication", "findings", "impression",
                 "mesh_major", "mesh_minor", "mesh_automatic", "image_ids"]
_SECTIONS = {"COMPARISON": "comparison", "INDICATION": "indication", "FINDINGS": "findings",
             "IMPRESSION": "impression"}
_HOW_TO_GET = (
    "Install the package that ships it (`pip install --no-deps torchxrayvision==1.5.7`), or "
    "download NLMCXR_reports.tgz from Open-i (https://openi.nlm.nih.gov/faq, 'Indiana University "
    f"chest X-ray collection') and pass its path or set {OPENI_ENV}=/path/to/NLMCXR_reports.tgz."
)


@dataclasses.dataclass(frozen=True)
class MeshTerm:
    """One MeSH indexing term such as "Pleural Effusion/left/small".

    `heading` keeps its case ("Pleural Effusion", "normal", "No Indexing");
    `qualifiers` are lower-cased and stripped ("left", "small") because the archive
    spells them inconsistently; `raw` is the term as written.
    """

    heading: str
    qualifiers: tuple[str, ...] = ()
    raw: str = ""

    @property
    def is_normal(self) -> bool:
        return self.heading.lower() == "normal"

    @property
    def is_unindexed(self) -> bool:
        """Terms that say nothing about the image ("No Indexing")."""
        return self.heading.lower() == "no indexing"


def parse_mesh_term(term: str) -> MeshTerm:
    """Split "Heading/qualifier/qualifier" into a MeshTerm (empty parts dropped)."""
    if not isinstance(term, str):
        raise TypeError(f"a MeSH term is a str, not {type(term).__name__}")
    parts = term.split("/")
    heading = re.sub(r"\s+", " ", parts[0]).strip()
    qualifiers = tuple(q for q in (re.sub(r"\s+", " ", p).strip().lower() for p in parts[1:]) if q)
    return MeshTerm(heading=heading, qualifiers=qualifiers, raw=term)


def openi_available() -> bool:
    """Whether the real IU X-Ray reports can be found (see find_openi_reports), without raising."""
    try:
        find_openi_reports()
        return True
    except Exception:   # noqa: BLE001 - any reason it cannot be found means "not available"
        return False


def find_openi_reports(path: str | os.PathLike | None = None) -> Path:
    """Where NLMCXR_reports.tgz is: `path`, else $CXPMRG_OPENI_TGZ, else inside torchxrayvision.

    torchxrayvision is located with importlib's finder only, never imported: it is
    installed without its dependencies and would not import.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"Open-i reports archive not found: {p}. {_HOW_TO_GET}")
        return p
    env = os.environ.get(OPENI_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DataError(f"${OPENI_ENV} points to {p}, which is not a file. {_HOW_TO_GET}")
        return p
    try:
        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "data" / "NLMCXR_reports.tgz"
        if p.is_file():
            return p
    raise DataError(f"cannot find NLMCXR_reports.tgz (Open-i / IU X-Ray reports). {_HOW_TO_GET}")


def _natural_key(name: str):
    m = re.search(r"(\d+)\.xml$", name)
    return (int(m.group(1)) if m else float("inf"), name)


def _parse_one(member: str, raw: bytes) -> tuple[dict, bool]:
    text, fallback = decode_text_counted(raw)
    if fallback:
        # Re-encode what we decoded; the declaration must then say UTF-8.
        text = re.sub(r"^<\?xml[^>]*\?>", '<?xml version="1.0" encoding="utf-8"?>', text.lstrip("\ufeff"))
    root = ET.fromstring(text.encode("utf-8") if fallback else raw)
    row = {"uid": "", "xml_name": member, "comparison": "", "indication": "", "findings": "",
           "impression": "", "mesh_major": [], "mesh_minor": [], "mesh_automatic": [], "image_ids": []}
    uid = root.find("uId")
    if uid is not None:
        row["uid"] = (uid.get("id") or "").strip()
    for el in root.iter("AbstractText"):
        key = _SECTIONS.get((el.get("Label") or "").strip().upper())
        if key:
            row[key] = "".join(el.itertext()).strip()
    mesh = root.find("MeSH")
    if mesh is not None:
        for tag in ("major", "minor", "automatic"):
            row[f"mesh_{tag}"] = [t for t in ((e.text or "").strip() for e in mesh.findall(tag)) if t]
    row["image_ids"] = [pi.get("id").strip() for pi in root.findall("parentImage") if pi.get("id")]
    if not row["uid"]:
        raise ValueError("no <uId id=...> element")
    return row, fallback


def iter_openi_reports(path: str | os.PathLike | None = None, on_error: str = "raise",
                       skipped: list | None = None, fallbacks: list | None = None):
    """The reports one by one as row dicts (load_openi_reports' columns), in archive order, parsed
    while the archive is read: a caller can start work on the first reports before the last is read.
    `skipped` and `fallbacks`, when given, collect what load_openi_reports lists in its attrs."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    tgz = find_openi_reports(path)
    skipped = [] if skipped is None else skipped
    fallbacks = [] if fallbacks is None else fallbacks
    try:
        tar = tarfile.open(tgz, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz}: not a readable tar archive ({e})") from e
    with tar:
        try:
            for info in tar:
                if not info.isfile() or not info.name.lower().endswith(".xml"):
                    continue
                raw = tar.extractfile(info).read()
                try:
                    row, fallback = _parse_one(info.name, raw)
                except (ET.ParseError, ValueError) as e:
                    if on_error == "raise":
                        raise DataError(f"{tgz}: member {info.name} is not a valid report XML: {e}") from e
                    skipped.append((info.name, str(e)))
                    continue
                if fallback:
                    fallbacks.append(info.name)
                yield row
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tgz}: archive is damaged or truncated ({e})") from e


def load_openi_reports(path: str | os.PathLike | None = None, on_error: str = "raise") -> pd.DataFrame:
    """All Open-i reports as a DataFrame, one row per XML file, in file-number order.

    Columns: uid ("CXR1"), xml_name ("ecgen-radiology/1.xml"), comparison, indication,
    findings, impression (str, "" where absent), mesh_major, mesh_minor, mesh_automatic,
    image_ids (lists of str). `mesh_minor` is empty in the public archive, which has no
    <minor> terms; `mesh_automatic` holds the machine-extracted terms it has instead.

    on_error="raise" stops at the first malformed XML with a DataError naming it;
    "skip" leaves it out, logs a warning with the count, and lists
    (member, reason) pairs in `df.attrs["skipped"]`. Bytes that are not UTF-8 are
    decoded with a cp1252 fallback; the members concerned are listed in
    `df.attrs["decoded_with_fallback"]`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    tgz = find_openi_reports(path)
    t0 = time.perf_counter()
    skipped, fallbacks = [], []
    rows = list(iter_openi_reports(tgz, on_error=on_error, skipped=skipped, fallbacks=fallbacks))
    rows.sort(key=lambda r: _natural_key(r["xml_name"]))
    df = pd.DataFrame(rows, columns=OPENI_COLUMNS)
    df.attrs["source"] = str(tgz)
    df.attrs["skipped"] = skipped
    df.attrs["decoded_with_fallback"] = fallbacks
    if skipped:
        log.warning("skipped %d malformed report XML file(s) in %s (first: %s: %s)",
                    len(skipped), tgz, *skipped[0])
    if fallbacks:
        log.warning("%d report XML file(s) in %s were not valid UTF-8 and were decoded as cp1252 "
                    "with replacement (first: %s)", len(fallbacks), tgz, fallbacks[0])
    log.info("read %d Open-i reports from %s in %.2f s", len(df), tgz, time.perf_counter() - t0)
    return df
