"""Report text for the phantom, written sentence by sentence with the label each sentence carries.

Every sentence is produced together with the CheXpert labels it states, so the
findings and impression labels are the truth of the text (not of the image):
a positive mention gives 1.0, a hedged one ("possible", "may represent",
"cannot exclude", "questionable", "suspected") -1.0, a pertinent negative
("No pneumothorax.") 0.0, an unmentioned observation stays null. Section labels
aggregate sentences CheXpert-style (positive > uncertain > negative), and No
Finding is 1.0 when nothing but Support Devices is positive or uncertain in a
non-empty section. Conventions a rule labeller should follow on this text:
- "The lungs are clear." is a pertinent negative for Lung Opacity only (a clear lung has
  no opacity; consolidation, edema etc. stay unmentioned); "No acute cardiopulmonary
  process." names no observation.
- "cardiomediastinal silhouette is normal" negates both Enlarged Cardiomediastinum
  and Cardiomegaly; "Heart size is normal." negates Cardiomegaly only.
- "consistent with / compatible with" is positive; every hedged sentence names one
  observation only. Rib fractures are always acute; devices are always positive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxpmrg_lib.data.observations import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

from .render import Finding, StudySpec

Sentence = tuple[str, dict]


@dataclass
class ReportText:
    findings: str
    impression: str
    findings_labels: dict
    impression_labels: dict


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "small": "mildly", "large": "markedly", "": "moderately"}
_RIB = {"apex": 3, "upper": 4, "middle": 6, "lower": 8, "base": 9, "": 6}
_ORD = {3: "3rd", 4: "4th", 6: "6th", 8: "8th", 9: "9th", 7: "7th", 5: "5th"}


def location(f: Finding, rng) -> str:
    """Anatomical place of a lung finding in radiology words ("right lower lobe", "lingula", ...)."""
    side, zone = f.side or "right", f.zone or "lower"
    if side == "bilateral":
        return {"base": "lung bases", "lower": "lower lobes", "upper": "upper lobes", "apex": "lung apices",
                "middle": "mid lungs"}.get(zone, "lower lobes")
    if zone == "middle":
        return "right middle lobe" if side == "right" else _pick(rng, ["lingula", "left mid lung"])
    if zone == "base":
        return _pick(rng, [f"{side} lung base", f"{side} base"])
    if zone == "apex":
        return f"{side} apex"
    return f"{side} {zone} lobe"


def _sev(f: Finding, default="moderate") -> str:
    return f.severity or default


def _noun_phrase(f: Finding, rng) -> str:
    """A short noun phrase for the finding, used in hedged sentences and impressions."""
    o = f.observation
    if o == "Enlarged Cardiomediastinum":
        return _pick(rng, ["mediastinal widening", "widening of the mediastinum"])
    if o == "Cardiomegaly":
        return _pick(rng, [f"{_sev(f)} cardiomegaly", f"{_sev(f)} enlargement of the cardiac silhouette"])
    if o == "Lung Opacity":
        loc = location(f, rng)
        return _pick(rng, [f"patchy opacity in the {loc}", f"{loc} opacity", f"airspace opacity in the {loc}"]) \
            if f.side != "bilateral" else _pick(rng, [f"patchy bilateral opacities in the {loc}", f"bilateral opacities in the {loc}"])
    if o == "Lung Lesion":
        return f"a {location(f, rng)} {'mass' if f.kind == 'mass' else 'nodule'}"
    if o == "Edema":
        return _pick(rng, [f"{_sev(f)} pulmonary edema", f"{_sev(f)} interstitial edema"])
    if o == "Consolidation":
        return _pick(rng, [f"{location(f, rng)} consolidation", f"consolidation in the {location(f, rng)}"])
    if o == "Pneumonia":
        return _pick(rng, [f"{location(f, rng)} pneumonia", f"pneumonia in the {location(f, rng)}"])
    if o == "Atelectasis":
        if f.side == "bilateral" and f.zone in ("base", "lower", ""):
            return _pick(rng, ["bibasilar atelectasis", f"{_sev(f, 'mild')} bibasilar atelectasis"])
        return _pick(rng, [f"{location(f, rng)} atelectasis", f"atelectasis in the {location(f, rng)}"])
    if o == "Pneumothorax":
        return f"{_sev(f, 'small')} {f.side} pneumothorax"
    if o == "Pleural Effusion":
        if f.side == "bilateral":
            return _pick(rng, [f"{_sev(f, 'small')} bilateral pleural effusions", f"{_sev(f, 'small')} bilateral effusions"])
        return _pick(rng, [f"{_sev(f, 'small')} {f.side} pleural effusion", f"{_sev(f, 'small')}-sized {f.side} pleural effusion"])
    if o == "Pleural Other":
        return f"{f.side + ' ' if f.side != 'bilateral' else 'bilateral '}{'apical ' if f.zone == 'apex' else ''}pleural thickening"
    if o == "Fracture":
        return f"a fracture of the {f.side} {_ORD[_RIB[f.zone]]} rib"
    if o == "Support Devices":
        return _device_phrase(f, rng)
    raise ValueError(f"no phrase for observation {o!r}")


def _device_phrase(f: Finding, rng) -> str:
    side = f.side or "right"
    k = f.kind
    if k == "ett":
        return _pick(rng, [f"endotracheal tube terminates {int(rng.integers(3, 7))} cm above the carina",
                           "endotracheal tube in standard position", f"ET tube tip {int(rng.integers(3, 7))} cm above the carina"])
    if k == "ng_tube":
        return _pick(rng, ["nasogastric tube with tip in the stomach", "enteric tube courses below the diaphragm into the stomach",
                           "NG tube in the stomach"])
    if k == "central_line":
        return _pick(rng, [f"{side} internal jugular central venous catheter with tip in the SVC",
                           f"{side} IJ central line terminates in the superior vena cava"])
    if k == "picc":
        return _pick(rng, [f"{side} PICC line with tip in the lower SVC", f"{side} upper extremity PICC terminates at the cavoatrial junction"])
    if k == "pacemaker":
        return _pick(rng, [f"{side} chest wall pacemaker with leads in the right atrium and right ventricle",
                           "dual-lead pacemaker in place", f"{side}-sided pacemaker with leads in expected position"])
    if k == "sternal_wires":
        return _pick(rng, ["median sternotomy wires are intact", "intact sternotomy wires", "median sternotomy wires"])
    if k == "chest_tube":
        return _pick(rng, [f"{side} chest tube in place", f"{side}-sided chest tube"])
    raise ValueError(f"unknown device kind {k!r}")


def _positive_sentence(f: Finding, rng) -> str:
    """A findings-section sentence stating `f` as present (several phrasings per observation)."""
    o, sev = f.observation, f.severity
    if o == "Enlarged Cardiomediastinum":
        return _pick(rng, ["The mediastinum is widened.", "Widening of the mediastinum.", "The superior mediastinum is widened.",
                           "Mediastinal widening is noted."])
    if o == "Cardiomegaly":
        return _pick(rng, [f"{_cap(_sev(f))} cardiomegaly.", f"The heart is {_ADV[sev]} enlarged.",
                           f"The cardiac silhouette is {_ADV[sev]} enlarged.",
                           f"There is {_sev(f)} enlargement of the cardiac silhouette."])
    if o == "Lung Opacity":
        loc = location(f, rng)
        if f.side == "bilateral":
            return _pick(rng, [f"Patchy bilateral opacities in the {loc}.", f"There are hazy opacities in both {loc}."])
        return _pick(rng, [f"Patchy opacity in the {loc}.", f"There is a hazy opacity in the {loc}.",
                           f"Ill-defined airspace opacity in the {loc}.", f"Increased opacity at the {loc}."])
    if o == "Lung Lesion":
        loc = location(f, rng)
        if f.kind == "mass":
            size = round(float(rng.uniform(3.5, 7.0)), 1)
            return _pick(rng, [f"There is a {size} cm mass in the {loc}.", f"Lobulated mass in the {loc} measuring {size} cm.",
                               f"A large mass is present in the {loc}."])
        size = round(float(rng.uniform(0.8, 2.5)), 1)
        return _pick(rng, [f"There is a {size} cm nodule in the {loc}.", f"Rounded {size} cm pulmonary nodule in the {loc}.",
                           f"A nodule is seen in the {loc}, measuring {size} cm."])
    if o == "Edema":
        return _pick(rng, [f"{_cap(_sev(f))} pulmonary edema.", f"There is {_sev(f)} interstitial edema.",
                           f"{_cap(_sev(f))} perihilar edema with Kerley B lines.", f"Findings of {_sev(f)} pulmonary edema."])
    if o == "Consolidation":
        loc = location(f, rng)
        return _pick(rng, [f"Consolidation in the {loc}.", f"There is dense consolidation of the {loc}.",
                           f"{_cap(loc)} consolidation.", f"Focal consolidation in the {loc} with air bronchograms."])
    if o == "Pneumonia":
        loc = location(f, rng)
        return _pick(rng, [f"{_cap(loc)} pneumonia.", f"Findings are consistent with pneumonia in the {loc}.",
                           f"Pneumonia in the {loc}.", f"Findings compatible with {loc} pneumonia."])
    if o == "Atelectasis":
        if f.side == "bilateral" and f.zone in ("base", "lower", ""):
            return _pick(rng, ["Bibasilar atelectasis.", f"{_cap(_sev(f, 'mild'))} bibasilar atelectasis.",
                               "Linear atelectasis at both lung bases."])
        loc = location(f, rng)
        if f.severity in ("moderate", "large", "severe"):
            return _pick(rng, [f"Atelectasis of the {loc} with volume loss.", f"There is {f.severity} atelectasis in the {loc}."])
        return _pick(rng, [f"Linear atelectasis at the {loc}.", f"Plate-like atelectasis in the {loc}.",
                           f"Subsegmental atelectasis in the {loc}.", f"{_cap(loc)} atelectasis."])
    if o == "Pneumothorax":
        s = _sev(f, "small")
        return _pick(rng, [f"{_cap(s)} {f.side} pneumothorax.", f"There is a {s} {f.side} apical pneumothorax.",
                           f"{_cap(s)} {f.side}-sided pneumothorax."])
    if o == "Pleural Effusion":
        s = _sev(f, "small")
        if f.side == "bilateral":
            return _pick(rng, [f"{_cap(s)} bilateral pleural effusions.", f"{_cap(s)} bilateral effusions.",
                               f"There are {s} bilateral pleural effusions."])
        return _pick(rng, [f"{_cap(s)} {f.side} pleural effusion.", f"There is a {s} {f.side} pleural effusion.",
                           f"{_cap(s)}-sized {f.side} pleural effusion.",
                           f"Blunting of the {f.side} costophrenic angle consistent with a {s} pleural effusion."])
    if o == "Pleural Other":
        side = "bilateral" if f.side == "bilateral" else f.side
        if f.zone == "apex":
            return _pick(rng, [f"{_cap(side)} apical pleural thickening.", f"There is {side} apical pleural thickening."])
        return _pick(rng, [f"{_cap(side)} pleural thickening.", f"Pleural thickening along the {side} lateral chest wall.",
                           f"Calcified pleural plaques on the {side}." if side != "bilateral" else "Bilateral calcified pleural plaques."])
    if o == "Fracture":
        rib = _ORD[_RIB[f.zone]]
        return _pick(rng, [f"Acute fracture of the {f.side} {rib} rib.", f"There is a displaced fracture of the {f.side} {rib} posterior rib.",
                           f"Acute {f.side} {rib} rib fracture."])
    if o == "Support Devices":
        return _cap(_device_phrase(f, rng)) + "."
    raise ValueError(f"no sentence for observation {o!r}")


_HEDGES = ["Possible {np}.", "Cannot exclude {np}.", "Findings may represent {np}.", "Questionable {np}.", "Suspected {np}."]


def _mention(f: Finding, rng, short: bool = False) -> Sentence:
    label = UNCERTAIN if f.uncertain else POSITIVE
    if f.uncertain:
        text = _pick(rng, _HEDGES).format(np=_noun_phrase(f, rng))
    elif short:
        text = _cap(_noun_phrase(f, rng)) + "."
    else:
        text = _positive_sentence(f, rng)
    return text, {f.observation: label}


def _negatives(absent: set[str], rng, impression: bool = False) -> list[Sentence]:
    """Pertinent negatives for observations that are absent (never for present ones)."""
    out: list[Sentence] = []
    neg = lambda *obs: {o: NEGATIVE for o in obs}  # noqa: E731
    if not impression:
        if {"Enlarged Cardiomediastinum", "Cardiomegaly"} <= absent and rng.random() < 0.5:
            out.append((_pick(rng, ["The cardiomediastinal silhouette is within normal limits.", "Normal cardiomediastinal silhouette.",
                                    "The cardiomediastinal silhouette is normal."]), neg("Enlarged Cardiomediastinum", "Cardiomegaly")))
        else:
            if "Cardiomegaly" in absent and rng.random() < 0.8:
                out.append((_pick(rng, ["Heart size is normal.", "The cardiac silhouette is normal in size.", "Normal heart size."]),
                            neg("Cardiomegaly")))
            if "Enlarged Cardiomediastinum" in absent and rng.random() < 0.6:
                out.append((_pick(rng, ["The mediastinal contours are normal.", "Normal mediastinal contours."]),
                            neg("Enlarged Cardiomediastinum")))
        parenchyma = {"Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"}
        if parenchyma <= absent and rng.random() < 0.7:
            out.append((_pick(rng, ["The lungs are clear.", "Lungs are clear.", "The lungs are well expanded and clear."]),
                        neg("Lung Opacity")))
        if "Edema" in absent and rng.random() < 0.3:
            out.append((_pick(rng, ["No pulmonary edema.", "There is no edema."]), neg("Edema")))
        if "Lung Lesion" in absent and rng.random() < 0.15:
            out.append(("No pulmonary nodules or masses.", neg("Lung Lesion")))
        if "Lung Opacity" in absent and "Consolidation" not in absent and rng.random() < 0.2:
            out.append(("No other focal airspace opacity.", neg("Lung Opacity")))
    tri = {"Consolidation", "Pleural Effusion", "Pneumothorax"}
    p = 0.35 if impression else 0.9
    if rng.random() < p:
        if tri <= absent and rng.random() < 0.5:
            out.append((_pick(rng, ["No focal consolidation, pleural effusion, or pneumothorax.",
                                    "No consolidation, pleural effusion, or pneumothorax."]), neg(*tri)))
        else:
            if {"Pleural Effusion", "Pneumothorax"} <= absent and rng.random() < 0.6:
                out.append((_pick(rng, ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."]),
                            neg("Pleural Effusion", "Pneumothorax")))
            else:
                if "Pleural Effusion" in absent and rng.random() < 0.7:
                    out.append((_pick(rng, ["No pleural effusion.", "No pleural effusions."]), neg("Pleural Effusion")))
                if "Pneumothorax" in absent:
                    out.append((_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]), neg("Pneumothorax")))
            if "Consolidation" in absent and not impression and rng.random() < 0.5:
                out.append(("No focal consolidation.", neg("Consolidation")))
    if not impression and "Fracture" in absent and rng.random() < 0.25:
        out.append((_pick(rng, ["No acute fracture.", "No displaced rib fracture."]), neg("Fracture")))
    return out


_ORDER = ["Support Devices", "Enlarged Cardiomediastinum", "Cardiomegaly", "Edema", "Consolidation", "Pneumonia",
          "Lung Opacity", "Atelectasis", "Lung Lesion", "Pleural Effusion", "Pneumothorax", "Pleural Other", "Fracture"]
_IMPRESSION_NORMAL = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "No acute intrathoracic process."]


def section_labels(sentences: list[Sentence]) -> dict:
    """Aggregate sentence labels: positive > uncertain > negative; No Finding by the CheXpert rule."""
    out: dict = {k: None for k in CHEXPERT_LABELS}
    if not sentences:
        return out
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
    for _, labels in sentences:
        for k, v in labels.items():
            if out[k] is None or rank[v] > rank[out[k]]:
                out[k] = v
    abnormal = any(out[k] in (POSITIVE, UNCERTAIN) for k in CHEXPERT_LABELS[:12])
    out["No Finding"] = None if abnormal else POSITIVE
    return out


def compose_report(spec: StudySpec, rng: np.random.Generator) -> tuple[list[Sentence], list[Sentence]]:
    """Findings and impression sentences (each with its labels) describing `spec`."""
    order = {o: i for i, o in enumerate(_ORDER)}
    findings = sorted(spec.findings, key=lambda f: order[f.observation])
    present = {f.observation for f in findings}
    absent = set(CHEXPERT_LABELS[:13]) - present
    fs: list[Sentence] = [_mention(f, rng) for f in findings if f.observation == "Support Devices"]
    fs += [_mention(f, rng) for f in findings if f.observation != "Support Devices"]
    fs += _negatives(absent, rng)
    # impression: the main positives (most of them), or a normal statement
    imp: list[Sentence] = []
    abnormal = [f for f in findings if f.observation != "Support Devices"]
    for i, f in enumerate(abnormal):
        if i == 0 or rng.random() < 0.75:
            imp.append(_mention(f, rng, short=True))
    if not abnormal:
        imp.append((_pick(rng, _IMPRESSION_NORMAL + (["Normal chest radiograph."] if "Support Devices" not in present else [])), {}))
    devices = [f for f in findings if f.observation == "Support Devices"]
    if devices and rng.random() < 0.5:
        imp.insert(0, _mention(devices[0], rng, short=True))
    imp += _negatives(absent, rng, impression=True) if abnormal else []
    return fs, imp


def join_sentences(sentences: list[Sentence], numbered: bool = False) -> str:
    texts = [s for s, _ in sentences]
    if numbered and len(texts) > 1:
        return "\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1))
    return " ".join(texts)


def write_report(spec: StudySpec, rng: np.random.Generator) -> ReportText:
    fs, imp = compose_report(spec, rng)
    return ReportText(findings=join_sentences(fs), impression=join_sentences(imp, numbered=rng.random() < 0.4),
                      findings_labels=section_labels(fs), impression_labels=section_labels(imp))
