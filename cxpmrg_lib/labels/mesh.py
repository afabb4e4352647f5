"""IU X-Ray (Open-i) human MeSH indexing as CheXpert labels, and the labeller's agreement with it.

Why: the IU reports are the only real reports we may ship-test against offline, and
their MeSH terms were assigned by people reading them. Mapping MeSH headings to the
14 observations gives an independent check of the rule labeller on real language.
The indexing is itself imperfect (terms are sometimes missing, signs such as
"Costophrenic Angle/blunted" are indexed instead of the finding, old/chronic findings
are indexed like new ones), so agreement is a lower bound on labeller quality.

The mapping (`MESH_TO_CHEXPERT`), by meaning, one rule per heading; a rule may need
(`any_of`) or forbid (`none_of`) qualifiers:
- Enlarged Cardiomediastinum: Mediastinum with enlarged/prominent/widened (not of lymph nodes).
- Cardiomegaly: Cardiomegaly; Cardiac Shadow/enlarged (not "borderline" alone).
- Lung Opacity: Opacity, Infiltrate, Airspace Disease, Density (of lung, retrocardiac),
  Cicatrix of lung (scarring is an opacity, as in the labeller), Pulmonary Fibrosis,
  Lung Diseases, Interstitial; Markings/interstitial.
- Lung Lesion: Nodule, Mass, Neoplasms, Lung Neoplasms.
- Edema: Pulmonary Edema, Edema, Pulmonary Congestion, Heart Failure.
- Consolidation; Pneumonia; Atelectasis (Pulmonary Atelectasis, Atelectasis).
- Pneumothorax: Pneumothorax, Hydropneumothorax, Hemopneumothorax.
- Pleural Effusion: Pleural Effusion, Hydropneumothorax, Hemothorax, Hemopneumothorax.
- Pleural Other: Thickening/pleura, Pleura, Cicatrix/pleura.
- Fracture: Fractures, Bone.
- Support Devices: Catheters, Indwelling; Tube, Inserted; Medical Device; Implanted
  Medical Device; Stents; Pacemaker, Artificial. Not Surgical Instruments (clips) or
  Sutures, which are not support devices in CheXpert's sense.
- No Finding: "normal", and by the CheXpert rule any indexed report with no mapped
  pathology (all but Support Devices) -- so "Calcified Granuloma" alone is No Finding,
  as it is for the labeller.
Not mapped (no CheXpert observation): Costophrenic Angle/blunted (a sign), Calcified
Granuloma, Calcinosis, Lung/hypoinflation, Emphysema, spine and aorta terms, ...
Reports indexed "No Indexing" and reports with no findings and no impression text are
left out of the agreement.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import numpy as np
import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

__all__ = ["MeshRule", "MESH_TO_CHEXPERT", "mesh_to_labels", "mesh_label_frame", "mesh_agreement"]


@dataclasses.dataclass(frozen=True)
class MeshRule:
    """MeSH heading (case-insensitive) -> CheXpert labels, if its qualifiers allow."""

    heading: str
    labels: tuple[str, ...]
    any_of: tuple[str, ...] = ()      # at least one of these qualifiers must be present
    none_of: tuple[str, ...] = ()     # none of these may be present


_ENLARGED = ("enlarged", "prominent", "widened", "wide")
MESH_TO_CHEXPERT: list[MeshRule] = [
    MeshRule("Mediastinum", ("Enlarged Cardiomediastinum",), any_of=_ENLARGED, none_of=("lymph nodes",)),
    MeshRule("Cardiomegaly", ("Cardiomegaly",)),
    MeshRule("Cardiac Shadow", ("Cardiomegaly",), any_of=("enlarged",)),
    MeshRule("Opacity", ("Lung Opacity",)),
    MeshRule("Infiltrate", ("Lung Opacity",)),
    MeshRule("Airspace Disease", ("Lung Opacity",)),
    MeshRule("Density", ("Lung Opacity",), any_of=("lung", "retrocardiac")),
    MeshRule("Cicatrix", ("Lung Opacity",), none_of=("pleura",)),
    MeshRule("Pulmonary Fibrosis", ("Lung Opacity",)),
    MeshRule("Lung Diseases, Interstitial", ("Lung Opacity",)),
    MeshRule("Markings", ("Lung Opacity",), any_of=("interstitial",)),
    MeshRule("Nodule", ("Lung Lesion",)),
    MeshRule("Mass", ("Lung Lesion",)),
    MeshRule("Neoplasms", ("Lung Lesion",)),
    MeshRule("Lung Neoplasms", ("Lung Lesion",)),
    MeshRule("Pulmonary Edema", ("Edema",)),
    MeshRule("Edema", ("Edema",)),
    MeshRule("Pulmonary Congestion", ("Edema",)),
    MeshRule("Heart Failure", ("Edema",)),
    MeshRule("Consolidation", ("Consolidation",)),
    MeshRule("Pneumonia", ("Pneumonia",)),
    MeshRule("Pulmonary Atelectasis", ("Atelectasis",)),
    MeshRule("Atelectasis", ("Atelectasis",)),
    MeshRule("Pneumothorax", ("Pneumothorax",)),
    MeshRule("Hydropneumothorax", ("Pneumothorax", "Pleural Effusion")),
    MeshRule("Hemopneumothorax", ("Pneumothorax", "Pleural Effusion")),
    MeshRule("Pleural Effusion", ("Pleural Effusion",)),
    MeshRule("Hemothorax", ("Pleural Effusion",)),
    MeshRule("Thickening", ("Pleural Other",), any_of=("pleura",)),
    MeshRule("Pleura", ("Pleural Other",)),
    MeshRule("Cicatrix", ("Pleural Other",), any_of=("pleura",)),
    MeshRule("Fractures, Bone", ("Fracture",)),
    MeshRule("Catheters, Indwelling", ("Support Devices",)),
    MeshRule("Tube, Inserted", ("Support Devices",)),
    MeshRule("Medical Device", ("Support Devices",)),
    MeshRule("Implanted Medical Device", ("Support Devices",)),
    MeshRule("Stents", ("Support Devices",)),
    MeshRule("Pacemaker, Artificial", ("Support Devices",)),
    MeshRule("normal", ("No Finding",)),
]
_RULES_BY_HEADING: dict[str, list[MeshRule]] = {}
for _r in MESH_TO_CHEXPERT:
    _RULES_BY_HEADING.setdefault(_r.heading.lower(), []).append(_r)

_PATHOLOGIES = CHEXPERT_LABELS[:12]


def _parse(term):
    from cxpmrg_lib.data.openi import parse_mesh_term
    return parse_mesh_term(term) if isinstance(term, str) else term


def mesh_to_labels(mesh_terms: Iterable) -> dict[str, float]:
    """MeSH terms of one report (strings like "Pleural Effusion/left/small" or MeshTerm) ->
    {label: 1.0 or nan} over CHEXPERT_LABELS. MeSH only says what is present, so there
    are no 0.0 or -1.0 values. No Finding is 1.0 when the report is indexed (any term
    other than "No Indexing") and no pathology maps, as in the CheXpert rule."""
    out = {k: np.nan for k in CHEXPERT_LABELS}
    indexed = False
    for term in mesh_terms:
        t = _parse(term)
        if t.is_unindexed:
            continue
        indexed = True
        for rule in _RULES_BY_HEADING.get(t.heading.lower(), ()):
            q = set(t.qualifiers)
            if rule.any_of and not q.intersection(rule.any_of):
                continue
            if rule.none_of and q.intersection(rule.none_of):
                continue
            for lab in rule.labels:
                out[lab] = 1.0
    if any(out[k] == 1.0 for k in _PATHOLOGIES):
        out["No Finding"] = np.nan
    elif indexed:
        out["No Finding"] = 1.0
    return out


def mesh_label_frame(openi_df: pd.DataFrame) -> pd.DataFrame:
    """mesh_to_labels for every row of a load_openi_reports() frame (same index)."""
    rows = [mesh_to_labels(terms) for terms in openi_df["mesh_major"]]
    return pd.DataFrame(rows, columns=list(CHEXPERT_LABELS), index=openi_df.index)


def report_text(findings, impression) -> str:
    """Findings and impression as one text for labelling (a newline ends a sentence)."""
    parts = [p.strip() for p in (findings, impression) if isinstance(p, str) and p.strip()]
    return "\n".join(parts)


def _prf(gold: np.ndarray, pred: np.ndarray) -> tuple[int, float, float, float]:
    tp = int((gold & pred).sum())
    fp = int((~gold & pred).sum())
    fn = int((gold & ~pred).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return int(gold.sum()), p, r, f


def mesh_agreement(openi_df: pd.DataFrame | None = None, uncertain_as_positive: bool = False,
                   min_support: int = 20, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-label agreement of the rule labeller on IU findings + impression with the MeSH indexing.

    Rows: the 14 labels, then "macro (support >= min_support)" averaging precision,
    recall and F1 over the labels with at least `min_support` MeSH positives.
    Columns: support (MeSH positives), predicted (labeller positives), precision,
    recall, f1, included (bool: counted in the macro row).
    Labeller positive = 1.0 only (the r2gen convention) by default; with
    `uncertain_as_positive` 1.0 or -1.0. Reports indexed "No Indexing" or with no text are
    left out (the count is in `df.attrs["n_reports"]`). `labels` may pass precomputed
    label_reports output aligned with openi_df (saves the labelling time).
    """
    from cxpmrg_lib.labels.labeler import label_reports
    if openi_df is None:
        from cxpmrg_lib.data.openi import load_openi_reports
        openi_df = load_openi_reports()
    for col in ("findings", "impression", "mesh_major"):
        if col not in openi_df.columns:
            raise ValueError(f"mesh_agreement: openi_df has no column {col!r} (expected load_openi_reports() output)")
    texts = [report_text(f, i) for f, i in zip(openi_df["findings"], openi_df["impression"])]
    unindexed = [all(_parse(t).is_unindexed for t in terms) for terms in openi_df["mesh_major"]]
    keep = np.array([bool(t) and not u for t, u in zip(texts, unindexed)])
    gold = mesh_label_frame(openi_df).to_numpy()[keep]
    if labels is None:
        pred = label_reports([t for t, k in zip(texts, keep) if k]).to_numpy()
    else:
        pred = labels[list(CHEXPERT_LABELS)].to_numpy()[keep]
    pos = (pred == 1.0) | (pred == -1.0) if uncertain_as_positive else (pred == 1.0)
    rows = []
    for j, lab in enumerate(CHEXPERT_LABELS):
        s, p, r, f = _prf(gold[:, j] == 1.0, pos[:, j])
        rows.append({"label": lab, "support": s, "predicted": int(pos[:, j].sum()),
                     "precision": p, "recall": r, "f1": f, "included": s >= min_support})
    df = pd.DataFrame(rows).set_index("label")
    inc = df[df["included"]]
    df.loc[f"macro (support >= {min_support})"] = {
        "support": int(inc["support"].sum()), "predicted": int(inc["predicted"].sum()),
        "precision": inc["precision"].mean(), "recall": inc["recall"].mean(), "f1": inc["f1"].mean(),
        "included": False}
    df.attrs["n_reports"] = int(keep.sum())
    df.attrs["uncertain_as_positive"] = uncertain_as_positive
    log.info("MeSH agreement over %d IU reports: macro F1 %.3f", keep.sum(), df["f1"].iloc[-1])
    return df
