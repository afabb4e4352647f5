"""The data layer: every source becomes one study table (see ARCHITECTURE.md), then a torch Dataset.

`load_study_table(root)` is the one entry point: it recognises the folder
(CheXpert Plus native layout or an R2Gen annotation tree) and calls its loader.
The torch parts (StudyDataset, collate_studies, make_loader) are imported on first
use, so that reading tables does not pay for importing torch.
"""
from __future__ import annotations

import os

from cxpmrg_lib.data.check import check_tree, detect_kind, format_check, loader_options
from cxpmrg_lib.data.chexpert_plus import load_chexpert_plus, patient_split
from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.images import ImageLoadError, load_image
from cxpmrg_lib.data.openi import MeshTerm, find_openi_reports, load_openi_reports, parse_mesh_term
from cxpmrg_lib.data.r2gen import load_r2gen
from cxpmrg_lib.data.table import STUDY_COLUMNS, SPLITS, safe_join, validate_study_table
from cxpmrg_lib.data.text import clean_report, clean_report_iu, clean_report_mimic, decode_text, is_blank

__all__ = ["load_study_table", "DataError", "ImageLoadError", "load_image", "MeshTerm", "find_openi_reports",
           "load_openi_reports", "parse_mesh_term", "load_chexpert_plus", "patient_split", "load_r2gen",
           "STUDY_COLUMNS", "SPLITS", "safe_join", "validate_study_table", "clean_report", "clean_report_iu",
           "clean_report_mimic", "decode_text", "is_blank", "check_tree", "detect_kind", "format_check", "loader_options",
           "StudyDataset", "collate_studies", "make_loader"]

_TORCH_NAMES = ("StudyDataset", "collate_studies", "make_loader")


def load_study_table(root: str | os.PathLike, kind: str = "auto", **opts):
    """The study table of the dataset at `root`.

    kind: "auto" (detect_kind), "chexpert_plus" or "r2gen"; opts go to that loader
    (load_chexpert_plus / load_r2gen); options only the other loader takes (e.g.
    section= for an R2Gen tree) are ignored with a log line. Open-i alone has no images, so it is not a
    study table source: use load_openi_reports for its reports.
    """
    kind = detect_kind(root) if kind == "auto" else kind
    if kind == "chexpert_plus":
        return load_chexpert_plus(root, **loader_options(kind, opts))
    if kind == "r2gen":
        return load_r2gen(root, **loader_options(kind, opts))
    if kind == "openi":
        raise DataError(f"{root} holds Open-i reports without images, not a study table; use "
                        f"load_openi_reports() for the reports, or the iu-phantom built from them")
    raise ValueError(f"kind must be 'auto', 'chexpert_plus' or 'r2gen', not {kind!r}")


def __getattr__(name):
    if name in _TORCH_NAMES:
        from cxpmrg_lib.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
