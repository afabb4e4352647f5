"""Speed of the metric suite (run: .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_metrics.py).

Goals (issue 3): the whole suite (NLG incl. METEOR JVM start, CE, 1,000 bootstrap CIs)
on 1,000 reports of ~60 words in under 30 s; CE with 1,000 bootstrap resamples on
10,000 reports in under 10 s.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib import metrics
from cxpmrg_lib.metrics.nlg import close_meteor
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

SENTENCES = [
    "the heart is normal in size", "the cardiomediastinal silhouette is within normal limits",
    "there is mild cardiomegaly", "the heart size is enlarged", "lungs are clear bilaterally",
    "no focal consolidation is seen", "there is a small left pleural effusion",
    "no pleural effusion or pneumothorax", "mild pulmonary edema is present",
    "there is bibasilar atelectasis", "a right lower lobe opacity may reflect pneumonia",
    "no acute osseous abnormality", "degenerative changes of the thoracic spine",
    "a right internal jugular catheter terminates in the svc", "the endotracheal tube is in good position",
    "there is a healed left rib fracture", "possible small right pneumothorax",
    "increased interstitial markings suggest edema", "stable appearance of the chest",
    "no evidence of acute cardiopulmonary process", "the aorta is tortuous and calcified",
    "low lung volumes with crowding of the bronchovascular markings", "a nodular opacity in the left upper lobe",
    "there is patchy opacity at the right base", "the mediastinum is not widened",
]


def make_reports(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """~60-word references and predictions that share about half of their sentences.

    Half the sentences get a random measurement, so that there are thousands of distinct
    sentences (the rule labeller caches labels per sentence; real reports vary too)."""
    rng = np.random.default_rng(seed)

    def sentence(i: int) -> str:
        s = SENTENCES[i]
        return f"{s} measuring {rng.integers(1, 60)} mm" if rng.random() < 0.5 else s

    refs, preds = [], []
    for _ in range(n):
        ref = [sentence(i) for i in rng.choice(len(SENTENCES), size=8, replace=False)]
        pred = [s if rng.random() < 0.5 else sentence(int(rng.integers(len(SENTENCES)))) for s in ref]
        refs.append(" . ".join(ref) + " .")
        preds.append(" . ".join(pred) + " .")
    return refs, preds


def keyword_labeler(texts):
    """Stand-in labeller (label_reports not importable): word spotting, 1 / -1 / 0 / NaN."""
    cues = {"Cardiomegaly": "cardiomegaly", "Edema": "edema", "Pleural Effusion": "effusion",
            "Atelectasis": "atelectasis", "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax",
            "Fracture": "fracture", "Lung Opacity": "opacity", "Support Devices": "tube"}
    rows = []
    for t in texts:
        row = dict.fromkeys(CHEXPERT_LABELS, np.nan)
        for label, cue in cues.items():
            if f"no {cue}" in t or f"or {cue}" in t:
                row[label] = 0.0
            elif f"possible small right {cue}" in t or f"may reflect {cue}" in t:
                row[label] = -1.0
            elif cue in t:
                row[label] = 1.0
        rows.append(row)
    return pd.DataFrame(rows, columns=CHEXPERT_LABELS)


def _labeler():
    try:
        from cxpmrg_lib.labels.labeler import clear_cache, label_reports
        clear_cache()  # time the labelling from cold
        return label_reports, "cxpmrg_lib.labels.labeler.label_reports (sentence cache cleared first)"
    except ImportError:
        return keyword_labeler, "a keyword stand-in (cxpmrg_lib.labels.labeler not importable)"


@pytest.mark.benchmark
def test_suite_1000_reports():
    refs, preds = make_reports(1000)
    words = np.mean([len(r.split()) for r in refs])
    n_sentences = len({x for r in refs + preds for x in r.split(" . ")})
    labeler, which = _labeler()
    close_meteor()  # include the JVM start
    t0 = time.perf_counter()
    st = metrics.study_stats(refs, preds, meteor=True, labeler=labeler)
    t1 = time.perf_counter()
    ci = st.bootstrap_ci(n_boot=1000, seed=0)
    t2 = time.perf_counter()
    print(f"\n1,000 reports (~{words:.0f} words, {n_sentences} distinct sentences), labeller: {which}")
    print(f"  scoring (JVM start + BLEU/METEOR/ROUGE-L/CIDEr + CE labelling): {t1 - t0:.1f} s")
    print(f"  1,000 bootstrap CIs for all {len(ci)} metrics:                 {t2 - t1:.1f} s")
    print(f"  total: {t2 - t0:.1f} s (goal < 30 s)")
    print(f"  bleu4 {st.values['bleu4']:.4f} CI {ci['bleu4'][0]:.4f}-{ci['bleu4'][1]:.4f}, "
          f"meteor {st.values['meteor']:.4f}, cider {st.values['cider']:.4f}, ce_f1 {st.values['ce_f1']:.4f}")
    # Parts, with the JVM warm:
    for name, keys in (("bleu", ["bleu4"]), ("rouge", ["rouge_l"]), ("cider", ["cider"]), ("meteor", ["meteor"]),
                       ("ce", ["ce_f1"])):
        t = time.perf_counter()
        metrics.study_stats(refs, preds, metrics=keys, labeler=labeler)
        print(f"  part {name:<7} {time.perf_counter() - t:6.2f} s (JVM warm)")
    assert np.isfinite(st.values["meteor"])


@pytest.mark.benchmark
def test_ce_bootstrap_10000_reports():
    refs, preds = make_reports(10_000, seed=1)
    labeler, which = _labeler()
    t0 = time.perf_counter()
    ref_labels, pred_labels = labeler(refs), labeler(preds)
    t1 = time.perf_counter()
    st = metrics.study_stats(refs, preds, metrics=metrics.CE_KEYS, ref_labels=ref_labels,
                             pred_labels=pred_labels)
    t2 = time.perf_counter()
    ci = st.bootstrap_ci(n_boot=1000, seed=0)
    t3 = time.perf_counter()
    print(f"\n10,000 reports, labeller: {which}")
    print(f"  labelling both sides: {t1 - t0:.1f} s")
    print(f"  CE from label frames (all 3 conventions): {t2 - t1:.2f} s")
    print(f"  1,000 bootstrap resamples, {len(ci)} CE metrics: {t3 - t2:.2f} s (goal with labelling < 10 s)")
    print(f"  total: {t3 - t0:.1f} s; ce_f1 {st.values['ce_f1']:.4f} CI {ci['ce_f1'][0]:.4f}-{ci['ce_f1'][1]:.4f}")
    assert ci["ce_f1"][0] <= st.values["ce_f1"] <= ci["ce_f1"][1]
