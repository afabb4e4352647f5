"""The embedded default data: synthetic radiographs with known findings, on disk in real layouts.

`write_phantom` writes a miniature CheXpert Plus (CSV with the 27 real columns, PNG
tree, chexbert_labels JSON Lines) so the default run goes through the same loader
as the real dataset. `write_iu_phantom` keeps the real IU X-Ray reports and renders
a radiograph for each from its human MeSH indexing, as an R2Gen annotation tree.
Both are synthetic: the images are drawn (render), the CheXpert Plus
reports are templated (reports); results on them are not the paper's.

Determinism: each study draws from its own generator seeded by (seed, study index),
so the same seed gives byte-identical trees whatever the number of workers.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import multiprocessing as mp
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxpmrg_lib.util.fileio import atomic_dir
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

from cxpmrg_lib.util.errors import DataError
from .render import (OBSERVATIONS, Anatomy, Finding, StudySpec, render_lateral,
                             render_study, sample_anatomy)
from .reports import write_report

log = logging.getLogger(__name__)

__all__ = ["write_phantom", "write_iu_phantom", "render_study", "render_lateral", "sample_study_spec",
           "sample_anatomy", "Finding", "Anatomy", "StudySpec", "PREVALENCE", "expected_prevalence", "DATASET_MARKER",
           "CHEXPERT_PLUS_COLUMNS", "mesh_to_findings"]

CHEXPERT_PLUS_COLUMNS = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
    "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
    "section_technique", "section_procedure_comments", "section_findings", "section_impression",
    "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race",
    "ethnicity", "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split",
]

# ----------------------------------------------------------------------------- prevalence
# The one table of probabilities behind the phantom (per study).
# A study is normal (no finding but possibly devices) with P_NORMAL; otherwise it gets
# one syndrome (by weight), each observation of that syndrome independently with the
# given probability (the first one if none was drawn), plus independent incidentals.
# Devices depend on the view only. Every non-device finding is hedged with P_HEDGE.
PREVALENCE = {
    "P_NORMAL": 0.34,
    "P_AP": 0.45,                       # portable AP (inpatient/ICU), else PA
    "P_DEVICES": {"AP": 0.55, "PA": 0.07},
    "DEVICE_KIND": {"AP": {"ett": 0.4, "ng_tube": 0.4, "central_line": 0.35, "picc": 0.25, "pacemaker": 0.1,
                           "sternal_wires": 0.15},
                    "PA": {"pacemaker": 0.45, "sternal_wires": 0.4, "picc": 0.2, "central_line": 0.1}},
    "P_CHEST_TUBE": 0.3,                # with a pneumothorax or effusion on an AP film
    "P_HEDGE": 0.10,
    "SYNDROMES": {
        "heart_failure": (0.24, {"Cardiomegaly": 0.85, "Edema": 0.65, "Pleural Effusion": 0.6,
                                 "Enlarged Cardiomediastinum": 0.15, "Atelectasis": 0.2}),
        "infection": (0.22, {"Pneumonia": 0.7, "Consolidation": 0.5, "Lung Opacity": 0.6, "Pleural Effusion": 0.15}),
        "postoperative": (0.16, {"Atelectasis": 0.85, "Pleural Effusion": 0.55, "Lung Opacity": 0.2}),
        "opacity": (0.11, {"Lung Opacity": 1.0, "Atelectasis": 0.25}),
        "mass": (0.09, {"Lung Lesion": 1.0, "Pleural Effusion": 0.15, "Enlarged Cardiomediastinum": 0.15}),
        "pneumothorax": (0.07, {"Pneumothorax": 1.0, "Fracture": 0.2, "Pleural Effusion": 0.1}),
        "trauma": (0.06, {"Fracture": 1.0, "Pneumothorax": 0.2, "Lung Opacity": 0.25}),
        "pleural": (0.05, {"Pleural Other": 1.0, "Pleural Effusion": 0.2}),
    },
    "INCIDENTAL": {"Atelectasis": 0.08, "Cardiomegaly": 0.06, "Lung Lesion": 0.03, "Enlarged Cardiomediastinum": 0.03,
                   "Fracture": 0.02, "Pleural Other": 0.02},
}


def expected_prevalence(table: dict = PREVALENCE) -> dict:
    """Fraction of studies with each observation present (positive or hedged) under `table`."""
    pn = table["P_NORMAL"]
    out = {o: 0.0 for o in CHEXPERT_LABELS}
    weights = {k: w for k, (w, _) in table["SYNDROMES"].items()}
    total = sum(weights.values())
    for name, (w, probs) in table["SYNDROMES"].items():
        none = math.prod(1 - p for p in probs.values())
        first = next(iter(probs))
        for o in OBSERVATIONS:
            p = probs.get(o, 0.0) + (none if o == first else 0.0)
            q = table["INCIDENTAL"].get(o, 0.0)
            out[o] += (1 - pn) * w / total * (1 - (1 - p) * (1 - q))
    pap = table["P_AP"]
    out["Support Devices"] = pap * table["P_DEVICES"]["AP"] + (1 - pap) * table["P_DEVICES"]["PA"]
    out["No Finding"] = pn
    return out


def _draw(rng, table: dict) -> str:
    """One key of `table`, with probability proportional to its value (one uniform draw;
    plain Python, as `rng.choice(p=...)` costs ~30 us a call in its argument checks)."""
    u = rng.random() * sum(table.values())
    acc = 0.0
    for k, w in table.items():
        acc += w
        if u < acc:
            return k
    return k


def _finding(o: str, rng, side=None, zone=None) -> Finding:
    """Side, zone, severity and kind of one finding, as they are spread in real reports."""
    lr = lambda: _draw(rng, {"right": 0.5, "left": 0.5})  # noqa: E731
    if o == "Enlarged Cardiomediastinum":
        return Finding(o, severity=_draw(rng, {"mild": 0.6, "moderate": 0.4}))
    if o == "Cardiomegaly":
        return Finding(o, severity=_draw(rng, {"mild": 0.45, "moderate": 0.35, "severe": 0.2}))
    if o == "Edema":
        return Finding(o, side="bilateral", severity=_draw(rng, {"mild": 0.45, "moderate": 0.4, "severe": 0.15}))
    if o in ("Lung Opacity", "Consolidation", "Pneumonia"):
        side = side or _draw(rng, {"right": 0.45, "left": 0.4, "bilateral": 0.15})
        zone = zone or _draw(rng, {"upper": 0.2, "middle": 0.15, "lower": 0.45, "base": 0.2})
        if side == "bilateral" and zone == "middle":
            zone = "lower"
        return Finding(o, side=side, zone=zone)
    if o == "Lung Lesion":
        kind = _draw(rng, {"nodule": 0.7, "mass": 0.3})
        return Finding(o, side=lr(), zone=_draw(rng, {"upper": 0.5, "middle": 0.25, "lower": 0.25}), kind=kind)
    if o == "Atelectasis":
        side = side or _draw(rng, {"bilateral": 0.4, "left": 0.35, "right": 0.25})
        zone = "base" if side == "bilateral" else _draw(rng, {"base": 0.6, "lower": 0.3, "middle": 0.1})
        return Finding(o, side=side, zone=zone, severity=_draw(rng, {"mild": 0.65, "moderate": 0.35}))
    if o == "Pneumothorax":
        return Finding(o, side=side if side in ("left", "right") else lr(),
                       severity=_draw(rng, {"small": 0.55, "moderate": 0.25, "large": 0.2}))
    if o == "Pleural Effusion":
        return Finding(o, side=side or _draw(rng, {"bilateral": 0.4, "right": 0.3, "left": 0.3}),
                       severity=_draw(rng, {"small": 0.55, "moderate": 0.3, "large": 0.15}))
    if o == "Pleural Other":
        return Finding(o, side=_draw(rng, {"right": 0.4, "left": 0.4, "bilateral": 0.2}),
                       zone=_draw(rng, {"apex": 0.4, "": 0.6}), kind=_draw(rng, {"thickening": 0.7, "plaques": 0.3}))
    if o == "Fracture":
        return Finding(o, side=side if side in ("left", "right") else lr(),
                       zone=_draw(rng, {"upper": 0.3, "middle": 0.4, "lower": 0.3}))
    raise ValueError(o)


def sample_study_spec(rng: np.random.Generator, view: str | None = None, sex: str | None = None,
                      base: Anatomy | None = None, table: dict = PREVALENCE) -> StudySpec:
    """A random study: anatomy plus findings drawn from `table` (see PREVALENCE)."""
    view = view or ("AP" if rng.random() < table["P_AP"] else "PA")
    sex = sex or ("Female" if rng.random() < 0.48 else "Male")
    anatomy = sample_anatomy(rng, view=view, sex=sex, base=base)
    findings: dict[str, Finding] = {}
    if rng.random() >= table["P_NORMAL"]:
        syn = _draw(rng, {k: w for k, (w, _) in table["SYNDROMES"].items()})
        probs = table["SYNDROMES"][syn][1]
        drawn = [o for o, p in probs.items() if rng.random() < p] or [next(iter(probs))]
        drawn += [o for o, q in table["INCIDENTAL"].items() if rng.random() < q and o not in drawn]
        # infection: pneumonia, consolidation and opacity share one place
        place = {}
        if syn == "infection":
            side = _draw(rng, {"right": 0.5, "left": 0.4, "bilateral": 0.1})
            place = dict(side=side, zone=_draw(rng, {"lower": 0.6, "upper": 0.25, "base": 0.15}))
        hf_side = "bilateral" if syn == "heart_failure" and rng.random() < 0.7 else None
        for o in drawn:
            kw = place if o in ("Pneumonia", "Consolidation", "Lung Opacity") else {}
            if o == "Pleural Effusion" and hf_side:
                kw = {"side": hf_side}
            f = _finding(o, rng, **kw)
            if rng.random() < table["P_HEDGE"]:
                f = replace(f, uncertain=True)
            findings[o] = f
    out = list(findings.values())
    if rng.random() < table["P_DEVICES"][view]:
        kinds = table["DEVICE_KIND"][view]
        chosen = [k for k, p in kinds.items() if rng.random() < p] or [_draw(rng, kinds)]
        for k in chosen:
            out.append(Finding("Support Devices", side=_draw(rng, {"right": 0.6, "left": 0.4}) if k != "pacemaker"
                               else _draw(rng, {"left": 0.8, "right": 0.2}), kind=k))
    if view == "AP" and rng.random() < table["P_CHEST_TUBE"]:
        for f in list(out):
            if f.observation in ("Pneumothorax", "Pleural Effusion") and f.side in ("left", "right"):
                out.append(Finding("Support Devices", side=f.side, kind="chest_tube"))
                break
    return StudySpec(anatomy, tuple(out))


# ----------------------------------------------------------------------------- CheXpert Plus phantom
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _png_bytes(img: np.ndarray) -> bytes:
    """8-bit greyscale PNG of `img`, written directly (any PNG reader decodes it).

    Why not PIL: its encoder tries every row filter and deflates with LZ77, ~5 ms at
    256 px. The phantom's grain makes matches rare, so the PNG "average" filter applied
    to all rows with numpy + Huffman-only deflate gives the same file size (~39 kB at
    256 px) in about a fifth of the time."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape
    left = np.zeros((h, w), np.uint8)  # neighbours, zero outside the image
    left[:, 1:] = img[:, :-1]
    up = np.zeros((h, w), np.uint8)
    up[1:] = img[:-1]
    # floor((left + up) / 2) without overflow: (l & u) + ((l ^ u) >> 1)
    pred = np.bitwise_and(left, up)
    np.bitwise_xor(left, up, out=left)
    left >>= 1
    pred += left
    raw = np.empty((h, w + 1), np.uint8)
    raw[:, 0] = 3  # filter type: average
    np.subtract(img, pred, out=raw[:, 1:])  # modulo 256, as the PNG filter arithmetic is
    z = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(raw.tobytes()) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


_RACES = {"White": 0.55, "Asian": 0.17, "Black or African American": 0.07, "Other": 0.13, "Unknown": 0.08}
_ETHNIC = {"Non-Hispanic/Non-Latino": 0.75, "Hispanic/Latino": 0.15, "Unknown": 0.1}
_INSURANCE = {"Medicare": 0.4, "Private Insurance": 0.4, "Medicaid": 0.15, "Unknown": 0.05}
_HISTORY = {
    "": ["Shortness of breath.", "Chest pain.", "Cough.", "Preoperative evaluation.", "Follow-up."],
    "Cardiomegaly": ["Congestive heart failure.", "Dyspnea, history of heart failure."],
    "Edema": ["Shortness of breath, evaluate for fluid overload."],
    "Pneumonia": ["Fever and cough, evaluate for pneumonia."],
    "Support Devices": ["Line placement.", "Intubated patient, evaluate tube position."],
    "Fracture": ["Fall, rib pain."],
    "Pneumothorax": ["Chest pain after procedure, evaluate for pneumothorax."],
    "Lung Lesion": ["History of lung cancer."],
}


def _plan_patients(studies: int, seed: int) -> list[dict]:
    """Patients, their number of studies and split (~10% of patients in valid)."""
    rng = np.random.default_rng([seed, 0])
    counts = []
    while sum(counts) < studies:
        counts.append(int(min(1 + rng.geometric(0.55) - 1, 6)))
    counts[-1] -= sum(counts) - studies
    counts = [c for c in counts if c > 0]
    ids = np.sort(rng.choice(64540, size=len(counts), replace=False) + 1)
    perm = rng.permutation(len(counts))
    valid = set(perm[: max(1 if studies >= 10 else 0, round(0.1 * len(counts)))].tolist())
    out = []
    for i, (pid, c) in enumerate(zip(ids, counts)):
        prng = np.random.default_rng([seed, 1, int(pid)])
        out.append(dict(pid=int(pid), n=c, split="valid" if i in valid else "train",
                        age=int(np.clip(prng.normal(60, 17), 18, 90)),
                        sex="Female" if prng.random() < 0.45 else "Male", race=_draw(prng, _RACES),
                        ethnicity=_draw(prng, _ETHNIC), interpreter="Yes" if prng.random() < 0.06 else "No",
                        insurance=_draw(prng, _INSURANCE), bmi=round(float(np.clip(prng.normal(27, 5.5), 15, 55)), 1),
                        deceased="Yes" if prng.random() < 0.12 else "No", anatomy_seed=int(prng.integers(2**31))))
    return out


def _study_job(job: tuple) -> tuple[dict, dict, dict, list[dict]]:
    """Render, describe and write one study (runs in a worker)."""
    root, seed, index, pat, order, size = job
    rng = np.random.default_rng([seed, 2, index])
    base = sample_anatomy(np.random.default_rng(pat["anatomy_seed"]), sex=pat["sex"])
    spec = sample_study_spec(rng, sex=pat["sex"], base=base)
    a = spec.anatomy
    img = render_study(spec, size, np.random.default_rng([seed, 3, index]))
    rel = f"{pat['split']}/patient{pat['pid']:05d}/study{order}/view1_frontal"
    png = Path(root) / "PNG" / f"{rel}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(_png_bytes(img))
    rep = write_report(spec, rng)
    no_findings = rng.random() < 0.03  # real reports sometimes have an impression only
    present = {f.observation for f in spec.findings}
    hist_key = next((k for k in _HISTORY if k in present), "")
    history = _HISTORY[hist_key][int(rng.integers(len(_HISTORY[hist_key])))]
    use_history = rng.random() < 0.3
    comparison = "None." if order == 1 or rng.random() < 0.2 else f"Chest radiograph from {int(rng.integers(1, 30))} days prior."
    technique = "Single AP portable view of the chest." if a.view == "AP" else \
        ["PA view of the chest.", "PA and lateral views of the chest."][int(rng.integers(2))]
    narrative = "XR CHEST 1 VIEW AP PORTABLE" if a.view == "AP" else "XR CHEST PA"
    if rng.random() < 0.15:
        technique = ""
    procedure = "Exam performed at bedside." if a.view == "AP" and rng.random() < 0.1 else ""
    end = "I have personally reviewed the images and agree with the findings." if rng.random() < 0.6 else ""
    abnormal = any(f.observation != "Support Devices" for f in spec.findings)
    summary = ("4-POSSIBLE SIGNIFICANT FINDINGS, MAY NEED ACTION" if abnormal else "1-NORMAL") if rng.random() < 0.4 else ""
    accession = str(int(rng.integers(10**7, 10**8)))
    findings_text = "" if no_findings else rep.findings
    parts = [("NARRATIVE:", narrative), ("HISTORY:" if use_history else "CLINICAL HISTORY:", history),
             ("COMPARISON:", comparison), ("TECHNIQUE:", technique), ("PROCEDURE COMMENTS:", procedure),
             ("FINDINGS:", findings_text), ("IMPRESSION:", rep.impression), ("END OF IMPRESSION:", end),
             ("SUMMARY:", summary), ("ACCESSION NUMBER:", accession)]
    report = "\n\n".join(f"{h}\n{t}" for h, t in parts if t)
    jpg = f"{rel}.jpg"
    row = dict(path_to_image=jpg, path_to_dcm=f"{rel}.dcm", frontal_lateral="Frontal", ap_pa=a.view,
               deid_patient_id=f"patient{pat['pid']:05d}", patient_report_date_order=order, report=report,
               section_narrative=narrative, section_clinical_history="" if use_history else history,
               section_history=history if use_history else "", section_comparison=comparison,
               section_technique=technique, section_procedure_comments=procedure, section_findings=findings_text,
               section_impression=rep.impression, section_end_of_impression=end, section_summary=summary,
               section_accession_number=accession, age=pat["age"], sex=pat["sex"], race=pat["race"],
               ethnicity=pat["ethnicity"], interpreter_needed=pat["interpreter"], insurance_type=pat["insurance"],
               recent_bmi=pat["bmi"], deceased=pat["deceased"], split=pat["split"])
    flab = {"path_to_image": jpg, **({k: None for k in CHEXPERT_LABELS} if no_findings else rep.findings_labels)}
    ilab = {"path_to_image": jpg, **rep.impression_labels}
    truth = [dict(path_to_image=jpg, study=f"{pat['split']}/patient{pat['pid']:05d}/study{order}", split=pat["split"],
                  view=a.view, observation=f.observation, side=f.side, zone=f.zone, severity=f.severity, kind=f.kind,
                  uncertain=f.uncertain) for f in spec.findings]
    if not abnormal:
        truth.append(dict(path_to_image=jpg, study=f"{pat['split']}/patient{pat['pid']:05d}/study{order}",
                          split=pat["split"], view=a.view, observation="No Finding", side="", zone="", severity="",
                          kind="", uncertain=False))
    return row, flab, ilab, truth


def _worker_init() -> None:
    """Pool worker set-up: one thread per process, and an allocator that keeps its memory.

    Rendering allocates and frees the same few hundred kB of arrays per image; glibc's
    default gives that memory back to the kernel each time and page-faults it in again
    (about a third of the drawing time). The workers are ours and short-lived, so they
    keep freed memory instead (mallopt; skipped where it is not glibc)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (also stops glibc adjusting both)
    except (OSError, AttributeError):
        pass


def _run_jobs(fn, jobs, workers: int | None, desc: str) -> list:
    """Map `fn` over jobs in order, in `workers` worker processes (all cores by default).

    Tiny job lists run in this process. Even one worker runs in its own process: it
    can tune its allocator (see `_worker_init`) without touching the caller's. `jobs` may
    be an iterator: the pool's feeder thread draws it while the workers run the first jobs
    (write_iu_phantom reads the reports archive so, instead of before rendering)."""
    from cxpmrg_lib.util.progress import tqdm

    workers = workers or os.cpu_count() or 1
    total = len(jobs) if hasattr(jobs, "__len__") else None
    if total is not None and total < 16:
        return [fn(j) for j in jobs]
    workers = min(workers, total or workers)
    chunk = max(4, min(32, total // (workers * 16) or 1)) if total is not None else 16  # small enough for the tail
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=chunk), total=total, desc=desc,
                         disable=total is not None and total < 200, leave=False))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


_README = """SYNTHETIC DATA - not patient data.

{what}
Generated by cxpmrg_lib ({fn}, seed {seed}, {size} px). The radiographs are drawn from
a parametric model of a chest X-ray with known findings (phantom_truth / mesh terms);
they are not real images. Results computed on this tree are phantom results, not
comparable with published numbers on the real dataset.
"""


# A small file in each generated tree that says what it is and whether it may be published
# (cxpmrg_lib.chapters.publish reads it; a real dataset tree can carry one too, to override the guess).
DATASET_MARKER = "dataset_manifest.json"


def _write_marker(folder: Path, dataset: str, name: str, licence: str, generator: str) -> None:
    marker = {"dataset": dataset, "name": name, "redistributable": True, "licence": licence,
              "synthetic": "images only" if dataset == "iu_phantom" else True, "generator": generator}
    (folder / DATASET_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def write_phantom(out: str | os.PathLike, studies: int = 500, size: int = 256, seed: int = 0,
                  overwrite: bool = False, workers: int | None = None) -> Path:
    """Write a miniature CheXpert Plus tree at `out` (see the module docstring) and return its path.

    Files: df_chexpert_plus_240401.csv (27 real columns; one frontal image per study),
    PNG/<path_to_image with .png>, chexbert_labels/{findings,impression}_fixed.json
    (labels of what each section says), phantom_truth.csv (drawn findings), README.txt,
    dataset_manifest.json (what the tree is; it may be published).
    Built in a temporary folder and renamed into place, so a crash leaves nothing behind.
    `workers` worker processes render the studies (default: one per core; fewer than 16
    studies render in this process); the tree is the same whatever their number.
    """
    if studies < 1:
        raise DataError(f"write_phantom: studies must be >= 1, got {studies}")
    if size < 32:
        raise DataError(f"write_phantom: size must be >= 32 px, got {size}")
    patients = _plan_patients(studies, seed)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        jobs, index = [], 0
        for pat in patients:
            for order in range(1, pat["n"] + 1):
                jobs.append((str(tmp), seed, index, pat, order, size))
                index += 1
        log.info("rendering %d phantom studies at %d px", len(jobs), size)
        results = _run_jobs(_study_job, jobs, workers, "phantom")
        rows = [r[0] for r in results]
        df = pd.DataFrame(rows, columns=CHEXPERT_PLUS_COLUMNS)
        df.to_csv(tmp / "df_chexpert_plus_240401.csv", index=False, lineterminator="\n")
        (tmp / "chexbert_labels").mkdir()
        (tmp / "chexbert_labels" / "findings_fixed.json").write_text(_jsonl([r[1] for r in results]))
        (tmp / "chexbert_labels" / "impression_fixed.json").write_text(_jsonl([r[2] for r in results]))
        truth = pd.DataFrame([t for r in results for t in r[3]],
                             columns=["path_to_image", "study", "split", "view", "observation", "side", "zone",
                                      "severity", "kind", "uncertain"])
        truth.to_csv(tmp / "phantom_truth.csv", index=False, lineterminator="\n")
        what = (f"A miniature CheXpert Plus ({studies} studies, {len(patients)} patients) in the real layout:\n"
                "df_chexpert_plus_240401.csv, PNG/, chexbert_labels/. Reports are templated text whose\n"
                "chexbert_labels are exact by construction; phantom_truth.csv lists the drawn findings.")
        (tmp / "README.txt").write_text(_README.format(what=what, fn="write_phantom", seed=seed, size=size))
        _write_marker(tmp, "phantom", "phantom (synthetic CheXpert Plus)", "same as this project (MIT)",
                      "cxpmrg_lib.data.phantom.write_phantom")
    log.info("wrote the phantom (%d studies) to %s", studies, out)
    return Path(out)


# ----------------------------------------------------------------------------- IU X-Ray phantom
_SEV_WORDS = {"mild": "mild", "borderline": "mild", "small": "small", "moderate": "moderate", "large": "large",
              "severe": "severe", "minimal": "mild"}
_LESION_HEADS = {"Nodule": "nodule", "Mass": "mass"}
_OPACITY_HEADS = {"Opacity", "Density", "Airspace Disease", "Infiltrate"}


def _mesh_place(quals: tuple[str, ...]) -> tuple[str, str, str]:
    """Side, zone and severity words from MeSH qualifiers."""
    q = [s.strip().lower() for s in quals]
    side = "bilateral" if "bilateral" in q else "right" if "right" in q else "left" if "left" in q else ""
    zone = ""
    for word, z in (("apex", "apex"), ("upper lobe", "upper"), ("middle lobe", "middle"), ("lingula", "middle"),
                    ("lower lobe", "lower"), ("base", "base"), ("retrocardiac", "base"), ("hilum", "middle")):
        if word in q:
            zone = z
            break
    sev = next((_SEV_WORDS[s] for s in q if s in _SEV_WORDS), "")
    return side, zone, sev


def mesh_to_findings(heading: str, qualifiers: tuple[str, ...]) -> list[Finding] | None:
    """Findings to draw for one MeSH major term; [] for "normal", None when it is not drawn."""
    h = heading.strip()
    q = {s.strip().lower() for s in qualifiers}
    side, zone, sev = _mesh_place(qualifiers)
    lr = side if side in ("left", "right") else "right"
    if h.lower() == "normal":
        return []
    if h in ("Cardiomegaly",) or (h in ("Cardiac Shadow", "Heart") and "enlarged" in q):
        return [Finding("Cardiomegaly", severity=sev if sev in ("mild", "moderate", "severe") else "mild")]
    if h == "Mediastinum" and q & {"prominent", "enlarged"}:
        return [Finding("Enlarged Cardiomediastinum", severity="mild")]
    if h in _OPACITY_HEADS:
        if "interstitial" in q and side == "bilateral":
            return [Finding("Edema", side="bilateral", severity="mild")]
        return [Finding("Lung Opacity", side=side or "right", zone=zone or "lower")]
    if h == "Consolidation":
        return [Finding("Consolidation", side=side or "right", zone=zone or "lower")]
    if h == "Pneumonia":
        return [Finding("Pneumonia", side=side or "right", zone=zone or "lower")]
    if h == "Pulmonary Atelectasis" or h == "Volume Loss":
        return [Finding("Atelectasis", side=side or "bilateral", zone=zone or "base",
                        severity="moderate" if sev in ("moderate", "severe", "large") else "mild")]
    if h in ("Pulmonary Edema", "Pulmonary Congestion"):
        return [Finding("Edema", side="bilateral", severity=sev if sev in ("moderate", "severe") else "mild")]
    if h == "Pleural Effusion":
        return [Finding("Pleural Effusion", side=side or "bilateral", severity=sev if sev in ("small", "moderate", "large") else "small")]
    if h == "Costophrenic Angle" and "blunted" in q:
        return [Finding("Pleural Effusion", side=side or "bilateral", severity="small")]
    if h == "Pneumothorax":
        return [Finding("Pneumothorax", side=lr, severity=sev if sev in ("small", "moderate", "large") else "small")]
    if h in ("Hydropneumothorax", "Hemopneumothorax"):
        return [Finding("Pneumothorax", side=lr, severity="small"), Finding("Pleural Effusion", side=lr, severity="small")]
    if h in _LESION_HEADS:
        return [Finding("Lung Lesion", side=side if side in ("left", "right") else "right", zone=zone or "upper",
                        kind=_LESION_HEADS[h])]
    if (h == "Thickening" and "pleura" in q) or h == "Pleura":
        return [Finding("Pleural Other", side=side or "right", zone="apex" if zone == "apex" else "", kind="thickening")]
    if h == "Fractures, Bone" and ("ribs" in q or len(q - {"left", "right", "bilateral", "multiple", "healed"}) == 0):
        return [Finding("Fracture", side=lr, zone=zone if zone in ("upper", "middle", "lower") else "middle")]
    if h == "Catheters, Indwelling":
        return [Finding("Support Devices", side=lr, kind="central_line")]
    if h == "Tube, Inserted":
        return [Finding("Support Devices", kind="ett" if q & {"trachea", "trachea, carina"} else "ng_tube")]
    if h == "Implanted Medical Device" and not q & {"aortic valve", "mitral valve", "abdomen", "shoulder"}:
        return [Finding("Support Devices", side=side if side in ("left", "right") else "left", kind="pacemaker")]
    if h == "Surgical Instruments" and q & {"mediastinum", "thorax", "sternum", "heart"}:
        return [Finding("Support Devices", kind="sternal_wires")]
    return None


def _merge(findings: list[Finding]) -> tuple[Finding, ...]:
    """One finding per observation (devices per kind); bilateral wins over one side, larger over smaller."""
    from .render import SEVERITY_SCALE

    out: dict = {}
    for f in findings:
        key = (f.observation, f.kind if f.observation == "Support Devices" else "")
        old = out.get(key)
        if old is None:
            out[key] = f
            continue
        side = old.side if old.side == f.side else "bilateral"
        if f.observation in ("Lung Lesion", "Fracture", "Pneumothorax", "Support Devices"):
            side = old.side
        sev = max((old.severity, f.severity), key=lambda s: SEVERITY_SCALE.get(s, 2.0))
        out[key] = replace(old, side=side, severity=sev)
    return tuple(out.values())


def _iu_job(job: tuple) -> None:
    """Render and write one iu-phantom study: 0.png frontal, then 1.png lateral when it has two views."""
    root, seed, index, uid, findings, size = job[:6]
    views = job[6] if len(job) > 6 else 2
    rng = np.random.default_rng([seed, 5, index])
    view = "AP" if any(f.observation == "Support Devices" and f.kind in ("ett", "ng_tube") for f in findings) else "PA"
    anatomy = sample_anatomy(rng, view=view, sex="Female" if rng.random() < 0.5 else "Male")
    spec = StudySpec(anatomy, findings)
    folder = Path(root) / "images" / uid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "0.png").write_bytes(_png_bytes(render_study(spec, size, np.random.default_rng([seed, 6, index]))))
    if views >= 2:
        (folder / "1.png").write_bytes(_png_bytes(render_lateral(spec, size, np.random.default_rng([seed, 7, index]))))


IU_SPLITS = ("random", "r2gen")


def _iu_text(v) -> str:
    return v.strip() if isinstance(v, str) else ""


def _iu_random_studies(df: pd.DataFrame, limit: int | None, seed: int) -> list[dict]:
    """The first iu-phantom: every report with findings or impression (the first `limit`), two views each,
    split 70/10/20 at random (seeded); a study's render index is its position."""
    df = df[[bool(_iu_text(f) or _iu_text(i)) for f, i in zip(df["findings"], df["impression"])]].reset_index(drop=True)
    if limit:
        df = df.iloc[: int(limit)].reset_index(drop=True)
    if df.empty:
        raise DataError("write_iu_phantom: no study with a findings or impression section")
    order = np.random.default_rng([seed, 4]).permutation(len(df))
    n_train, n_val = int(round(0.7 * len(df))), int(round(0.1 * len(df)))
    split = {}
    for rank, k in enumerate(order):
        split[int(k)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return [dict(index=i, id=str(u), report=_iu_text(f) or _iu_text(m), views=2, split=split[i], mesh_major=t)
            for i, (u, f, m, t) in enumerate(zip(df["uid"], df["findings"], df["impression"], df["mesh_major"]))]


def _proportional(limit: int, sizes: dict[str, int]) -> dict[str, int]:
    """`limit` shared among the splits in proportion to `sizes` (largest remainder), each non-empty split
    keeping at least one study when `limit` allows."""
    total = sum(sizes.values())
    if limit >= total:
        return dict(sizes)
    exact = {k: limit * n / total for k, n in sizes.items()}
    take = {k: min(sizes[k], int(v)) for k, v in exact.items()}
    for k in sorted(sizes, key=lambda k: exact[k] - int(exact[k]), reverse=True)[: limit - sum(take.values())]:
        take[k] += 1
    for k in sizes:                                   # a split left empty borrows from the largest
        if take[k] == 0 and sizes[k] and limit >= sum(1 for n in sizes.values() if n):
            take[max(take, key=take.get)] -= 1
            take[k] = 1
    return take


class _R2GenIU:
    """R2Gen's IU X-Ray over the Open-i reports: every report with a findings section and at least one
    image named in its XML; R2Gen's 296 validation and 590 test studies (data_manifests/iu_split),
    every other one trains. Ids are R2Gen's, a study's render index its Open-i report number (so it
    looks the same whatever `limit`); one view or two as the XML names images (two at most: frontal,
    lateral). `limit` keeps the membership and takes the first studies of each split in report-number
    order, in proportion to the full splits (at least one each when `limit` >= 3)."""

    def __init__(self, split_dir=None):
        from cxpmrg_lib.data.iu_split import load_iu_split

        ref = load_iu_split(split_dir)
        self.split = dict(zip(ref["number"].astype(int), ref["split"]))
        self.ref_id = dict(zip(ref["number"].astype(int), ref["study_id"]))
        self.seen: dict[int, tuple[bool, bool, str]] = {}   # report number -> (findings, image, id)
        self.full = collections.Counter()

    def study(self, row: dict) -> dict | None:
        from cxpmrg_lib.data.iu_split import openi_number, r2gen_study_id

        n = openi_number(row["xml_name"])
        findings = _iu_text(row.get("findings"))
        images = list(row.get("image_ids") or [])
        uid = r2gen_study_id(images) if images else ""
        self.seen[n] = (bool(findings), bool(images), uid)
        if not (findings and images):
            return None
        split = self.split.get(n, "train")
        self.full[split] += 1
        return dict(index=n, id=uid, report=findings, views=min(2, len(images)), split=split,
                    mesh_major=row.get("mesh_major"))

    def stream(self, rows):
        """Every qualifying study, as the reports are read (archive order)."""
        for row in rows:
            st = self.study(row)
            if st is not None:
                yield st

    def first(self, rows, limit: int) -> list[dict]:
        """The first studies of each split (report-number order), `limit` in all, split in proportion."""
        studies = sorted(self.stream(rows), key=lambda st: st["index"])
        take = _proportional(int(limit), {s: self.full[s] for s in ("train", "val", "test")})
        kept, out = collections.Counter(), []
        for st in studies:
            if kept[st["split"]] < take[st["split"]]:
                kept[st["split"]] += 1
                out.append(st)
        return out

    def summary(self, written: list[dict], limit: int | None) -> dict:
        """split.json: the counts, and R2Gen's studies not found (with why); a DataError where the split
        files and the reports disagree about an id, or two reports share one."""
        missing = []
        for n, s in sorted(self.split.items(), key=lambda kv: (kv[1] != "val", kv[0])):
            has_findings, has_image, uid = self.seen.get(n, (False, False, ""))
            why = ("not in the reports archive" if n not in self.seen else "no findings section" if not has_findings
                   else "no image named in its XML" if not has_image else "")
            if why:
                missing.append(dict(study_id=self.ref_id[n], split=s, openi_xml=f"{n}.xml", reason=why))
            elif uid != self.ref_id[n]:
                raise DataError(f"write_iu_phantom: the Open-i images of R2Gen's study {self.ref_id[n]} ({n}.xml) "
                                f"give the id {uid}: the split files and the reports disagree")
        ids = collections.Counter(st["id"] for st in written)
        dup = [k for k, v in ids.items() if v > 1]
        if dup:
            raise DataError(f"write_iu_phantom: two Open-i reports share the study id {dup[0]!r}")
        listed = {s: sum(1 for v in self.split.values() if v == s) for s in ("val", "test")}
        splits = ("train", "val", "test")
        return {
            "split": "r2gen",
            "source": "R2Gen (Chen et al., EMNLP 2020) via ReXrank's split files (MIT): data_manifests/iu_split",
            "limit": int(limit) if limit else None,
            "studies": {s: sum(1 for st in written if st["split"] == s) for s in splits},
            "two_views": {s: sum(1 for st in written if st["split"] == s and st["views"] == 2) for s in splits},
            "full_collection": {s: int(self.full[s]) for s in splits},
            "r2gen_listed": listed,
            "r2gen_found": {s: listed[s] - sum(1 for m in missing if m["split"] == s) for s in ("val", "test")},
            "missing": missing,
            "left_out": {"no findings section": sum(1 for f, _, _ in self.seen.values() if not f),
                         "findings but no image": sum(1 for f, i, _ in self.seen.values() if f and not i)},
        }


def write_iu_phantom(out: str | os.PathLike, reports: str | os.PathLike | None = None, size: int = 256, seed: int = 0,
                     overwrite: bool = False, workers: int | None = None, limit: int | None = None,
                     split: str = "random", split_dir: str | os.PathLike | None = None) -> Path:
    """Render radiographs for the real IU X-Ray reports and write an R2Gen tree at `out`.

    split="random" (the default, the book's tree so far): every report with a findings or
    impression section, its `report` the findings, else the impression; two views each; split
    70/10/20 by study, seeded; ids are Open-i's ("CXR12"). `limit` keeps the first N of them.

    split="r2gen": R2Gen's IU X-Ray (findings only, as R2Gen): every report with a findings
    section and at least one image named in its XML; validation and test are exactly R2Gen's
    296 and 590 studies (data_manifests/iu_split, or `split_dir`), every other one trains; ids are
    R2Gen's ("CXR12_IM-0160"); one view or two as the XML names images. `limit` keeps that
    membership and takes the first studies of each split (report-number order) in proportion to
    the full splits. split.json records the counts, the two-view counts and any R2Gen study not
    found (with the reason); they are logged too. Without `limit` the studies render while the
    reports archive is still being read.

    images/<id>/0.png is the frontal drawn from the study's MeSH major terms; 1.png (two-view
    studies) a simple lateral view of the same findings. mesh_mapping.json counts which terms were
    drawn and which were not.
    """
    from cxpmrg_lib.data.openi import iter_openi_reports, load_openi_reports, parse_mesh_term

    if split not in IU_SPLITS:
        raise ValueError(f"write_iu_phantom: split must be one of {IU_SPLITS}, not {split!r}")
    r2gen = None
    if split == "random":
        df = load_openi_reports(reports)
        for col in ("uid", "findings", "impression", "mesh_major"):
            if col not in df.columns:
                raise DataError(f"write_iu_phantom: the report table from {reports or 'the default NLMCXR_reports.tgz'} "
                                f"has no column {col!r}")
        studies = _iu_random_studies(df, limit, seed)
    else:
        r2gen = _R2GenIU(split_dir)
        rows = iter_openi_reports(reports)
        studies = r2gen.first(rows, limit) if limit else r2gen.stream(rows)
    mapped, unmapped = collections.Counter(), collections.Counter()
    written: list[dict] = []

    def jobs_of(root: str):
        for st in studies:
            found: list[Finding] = []
            terms = st["mesh_major"]
            for term in terms if isinstance(terms, (list, tuple)) else []:
                mt = parse_mesh_term(term)
                fs = mesh_to_findings(mt.heading, mt.qualifiers)
                if fs is None:
                    unmapped[mt.raw.strip() or term] += 1
                else:
                    mapped[mt.raw.strip() or term] += 1
                    found += fs
            st = {**st, "normal": not found}
            written.append(st)
            views = int(st["views"])
            yield (root, seed, int(st["index"]), st["id"], _merge(found), size) + ((views,) if views != 2 else ())

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if isinstance(studies, list):
            jobs = list(jobs_of(str(tmp)))
            log.info("rendering %d IU X-Ray studies (%d with 2 views) at %d px", len(jobs),
                     sum(1 for st in written if st["views"] == 2), size)
        else:
            jobs = jobs_of(str(tmp))
            log.info("rendering every IU X-Ray study with findings and an image (1 or 2 views) at %d px", size)
        _run_jobs(_iu_job, jobs, workers, "iu-phantom")
        if not written:
            raise DataError("write_iu_phantom: no study with a findings section and an image")
        written.sort(key=lambda st: st["index"])
        n = len(written)
        info = r2gen.summary(written, limit) if r2gen is not None else {}
        ann = {"train": [], "val": [], "test": []}
        for st in written:
            uid = st["id"]
            ann[st["split"]].append(dict(id=uid, report=st["report"],
                                         image_path=[f"{uid}/{v}.png" for v in range(int(st["views"]))],
                                         split=st["split"]))
        (tmp / "annotation.json").write_text(json.dumps(ann) + "\n")
        summary = {
            "studies": n,
            "mapped_terms": int(sum(mapped.values())),
            "unmapped_terms": int(sum(unmapped.values())),
            "normal_studies": int(sum(1 for st in written if st["normal"])),
            "mapped": dict(sorted(mapped.items(), key=lambda kv: (-kv[1], kv[0]))),
            "unmapped": dict(sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
        (tmp / "mesh_mapping.json").write_text(json.dumps(summary, indent=2) + "\n")
        if r2gen is None:
            what = (f"Real IU X-Ray reports (Open-i, CC BY-NC-ND 4.0) with synthetic radiographs drawn from their\n"
                    f"MeSH indexing, R2Gen layout: annotation.json + images/<id>/0.png (frontal), 1.png (lateral).\n"
                    f"{n} studies; see mesh_mapping.json for the terms that were and were not drawn.")
        else:
            (tmp / "split.json").write_text(json.dumps(info, indent=2) + "\n")
            what = (f"Real IU X-Ray reports (Open-i, CC BY-NC-ND 4.0; findings sections) with synthetic radiographs\n"
                    f"drawn from their MeSH indexing, R2Gen layout and R2Gen's split (Chen et al., EMNLP 2020):\n"
                    f"annotation.json + images/<id>/0.png (frontal), 1.png (lateral, where the study has two views).\n"
                    f"{n} studies (train/val/test {info['studies']['train']}/{info['studies']['val']}/"
                    f"{info['studies']['test']}); split.json for the split, mesh_mapping.json for the MeSH terms.")
        (tmp / "README.txt").write_text(_README.format(what=what, fn="write_iu_phantom", seed=seed, size=size))
        _write_marker(tmp, "iu_phantom", "iu-phantom (real IU X-Ray reports, rendered radiographs)",
                      "reports CC BY-NC-ND 4.0 (Indiana University / Open-i); rendered images MIT",
                      "cxpmrg_lib.data.phantom.write_iu_phantom")
    log.info("iu-phantom: %d studies, %d MeSH terms drawn, %d not drawn (top: %s)", n, sum(mapped.values()),
             sum(unmapped.values()), ", ".join(f"{k} x{v}" for k, v in unmapped.most_common(5)))
    if r2gen is not None:
        log.info("iu-phantom, R2Gen split: train/val/test %d/%d/%d studies (%d/%d/%d with two views); of R2Gen's "
                 "%d val and %d test studies %d and %d found with findings%s", *info["studies"].values(),
                 *info["two_views"].values(), *info["r2gen_listed"].values(), *info["r2gen_found"].values(),
                 f"; {len(info['missing'])} missing (split.json lists them): "
                 + ", ".join(f"{m['study_id']} ({m['reason']})" for m in info["missing"][:10])
                 + (", ..." if len(info["missing"]) > 10 else "") if info["missing"] else "")
    return Path(out)
