"""The public metric API: score_reports, bootstrap CIs and paired tests (METEOR off; see
test_metrics_meteor.py for the JVM)."""
import random

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib import metrics
from cxpmrg_lib.metrics.ce import ce_from_labels
from cxpmrg_lib.metrics.stats import bootstrap_p_value, bootstrap_weights, percentile_ci, permutation_p_value
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

FINDINGS = {"cardiomegaly": "Cardiomegaly", "edema": "Edema", "effusion": "Pleural Effusion",
            "atelectasis": "Atelectasis", "pneumothorax": "Pneumothorax", "opacity": "Lung Opacity"}


def labeler(texts):
    """Word spotting: 'no X' -> 0, 'possible X' -> -1, 'X' -> 1, else NaN."""
    rows = []
    for t in texts:
        row = dict.fromkeys(CHEXPERT_LABELS, np.nan)
        for word, label in FINDINGS.items():
            if f"no {word}" in t:
                row[label] = 0.0
            elif f"possible {word}" in t:
                row[label] = -1.0
            elif word in t:
                row[label] = 1.0
        rows.append(row)
    return pd.DataFrame(rows, columns=CHEXPERT_LABELS)


def reports(n, seed, quality, pred_seed=0):
    """References (fixed by `seed`) and predictions that keep each sentence with probability
    `quality` (drawn with `pred_seed`)."""
    rnd, rnd_pred = random.Random(seed), random.Random(1000 + pred_seed)
    sentences = ["heart size is normal", "mild cardiomegaly", "no edema", "mild edema", "small left effusion",
                 "no effusion", "possible atelectasis", "bibasilar atelectasis", "no pneumothorax",
                 "patchy opacity at the right base", "lungs are clear", "stable chest"]
    refs, preds = [], []
    for _ in range(n):
        ref = rnd.sample(sentences, 4)
        pred = [s if rnd_pred.random() < quality else rnd_pred.choice(sentences) for s in ref]
        refs.append(" . ".join(ref) + " .")
        preds.append(" . ".join(pred) + " .")
    return refs, preds


def test_score_reports_has_every_key_in_order():
    refs, preds = reports(40, 0, 0.6)
    out = metrics.score_reports(refs, preds, meteor=False, labeler=labeler)
    assert tuple(out)[:len(metrics.METRIC_KEYS)] == metrics.METRIC_KEYS
    assert len(metrics.METRIC_KEYS) == 31
    assert {"n_studies", "n_empty_predictions", "meteor_computed", "ce_convention", "notes"} <= set(out)
    assert out["n_studies"] == 40 and out["ce_convention"] == "r2gen"
    assert out["ce_f1"] == out["ce_r2gen_micro_f1"]
    want = ce_from_labels(labeler(refs), labeler(preds), "example")
    assert out["ce_example_f1"] == pytest.approx(want["f1"])
    ex = metrics.score_reports(refs, preds, meteor=False, labeler=labeler, convention="example")
    assert ex["ce_f1"] == pytest.approx(want["f1"]) and ex["ce_convention"] == "example"
    assert 0 < out["bleu4"] < out["bleu1"] < 1 and 0 < out["cider"]


def test_labels_can_be_passed_instead_of_a_labeler():
    refs, preds = reports(30, 1, 0.5)
    a = metrics.score_reports(refs, preds, meteor=False, labeler=labeler)
    b = metrics.score_reports(refs, preds, meteor=False, ref_labels=labeler(refs), pred_labels=labeler(preds))
    assert {k: a[k] for k in metrics.CE_KEYS} == {k: b[k] for k in metrics.CE_KEYS}


def test_non_string_and_missing_cells():
    refs = ["mild edema .", "no effusion .", "cardiomegaly ."]
    out = metrics.score_reports(refs, ["mild edema .", np.nan, 42], meteor=False, labeler=labeler)
    assert out["n_empty_predictions"] == 1
    assert out["ce_r2gen_micro_recall"] == pytest.approx(1 / 2)  # edema found, cardiomegaly missed


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    refs, preds = reports(120, 2, 0.6)
    st = metrics.study_stats(refs, preds, meteor=False, labeler=labeler)
    ci = st.bootstrap_ci(n_boot=300, seed=5)
    keys = [k for k in metrics.METRIC_KEYS if k != "meteor"]
    again, other = st.bootstrap_ci(n_boot=300, seed=5), st.bootstrap_ci(n_boot=300, seed=6)
    assert [ci[k] for k in keys] == [again[k] for k in keys]
    assert [ci[k] for k in keys] != [other[k] for k in keys]
    for k in ("bleu1", "bleu4", "rouge_l", "cider", "ce_f1", "ce_example_f1", "ce_unc_top5_macro_f1"):
        lo, hi = ci[k]
        assert lo < st.values[k] < hi, k
    assert np.isnan(ci["meteor"][0])
    # the public wrapper gives the same intervals
    assert metrics.bootstrap_ci(refs, preds, n_boot=300, seed=5, meteor=False, labeler=labeler,
                                metrics=["bleu4", "ce_f1"]) == {k: ci[k] for k in ("bleu4", "ce_f1")}


def test_ce_resample_equals_rescoring_the_resampled_labels():
    refs, preds = reports(90, 3, 0.5)
    st = metrics.study_stats(refs, preds, metrics=metrics.CE_KEYS, labeler=labeler)
    w = next(bootstrap_weights(90, 1, seed=9))
    idx = np.repeat(np.arange(90), w[0].astype(int))
    fast = st.resample(w)
    ref_l, pred_l = labeler(refs).iloc[idx].reset_index(drop=True), labeler(preds).iloc[idx].reset_index(drop=True)
    for conv, prefix in (("r2gen", "ce_r2gen_"), ("example", "ce_example_"), ("uncertain_positive", "ce_unc_")):
        slow = ce_from_labels(ref_l, pred_l, conv)
        for k, v in slow.items():
            if k not in ("precision", "recall", "f1") or conv == "example":
                assert fast[prefix + k][0] == pytest.approx(v, abs=1e-12), (conv, k)


def test_bootstrap_weights_are_resamples():
    blocks = list(bootstrap_weights(50, 300, seed=1))
    w = np.concatenate(blocks)
    assert w.shape == (300, 50) and np.all(w.sum(1) == 50) and len(blocks) == 3
    assert np.allclose(w.mean(0), 1.0, atol=0.3)
    assert np.array_equal(w, np.concatenate(list(bootstrap_weights(50, 300, seed=1))))


def test_paired_bootstrap_and_permutation_find_the_better_system():
    refs, good = reports(150, 4, 0.9)
    refs2, bad = reports(150, 4, 0.3)
    assert refs2 == refs
    for method in ("bootstrap", "permutation"):
        res = metrics.paired_test(refs, good, bad, metric="bleu4", n_resamples=500, method=method)
        assert res["delta"] > 0.2 and res["p_value"] < 0.01 and res["a_better"] is True
        assert res["delta"] == pytest.approx(res["value_a"] - res["value_b"])
        rev = metrics.paired_test(refs, bad, good, metric="ce_f1", n_resamples=500, method=method,
                                  labeler=labeler)
        assert rev["delta"] < 0 and rev["p_value"] < 0.01 and rev["a_better"] is False
    assert res["ci_delta"] is None
    boot = metrics.paired_test(refs, good, bad, metric="bleu4", n_resamples=500)
    assert boot["ci_delta"][0] > 0


def test_paired_test_of_a_system_against_itself_is_not_significant():
    refs, preds = reports(60, 5, 0.6)
    res = metrics.paired_test(refs, preds, list(preds), metric="cider", n_resamples=200)
    assert res["delta"] == 0 and res["p_value"] == 1.0 and not res["a_better"]
    # two systems of equal quality: no significant difference either way
    refs2, other = reports(60, 5, 0.6, pred_seed=1)
    assert refs2 == refs and other != preds
    res = metrics.paired_test(refs, preds, other, metric="rouge_l", n_resamples=400, method="permutation")
    assert res["p_value"] > 0.05


def test_paired_test_errors():
    refs, preds = reports(10, 7, 0.6)
    with pytest.raises(ValueError, match="method must be one of"):
        metrics.paired_test(refs, preds, preds, method="ttest")
    with pytest.raises(ValueError, match="needs meteor=True"):
        metrics.paired_test(refs, preds, preds, metric="meteor", meteor=False)
    a = metrics.study_stats(refs, preds, metrics=["bleu4"])
    b = metrics.study_stats(preds, refs, metrics=["bleu4"])
    with pytest.raises(ValueError, match="same references"):
        metrics.compare_stats(a, b)


def test_p_values_and_intervals():
    # observed delta 0.5; centred bootstrap deltas: 2 of 9 are at least as far from 0
    deltas = np.array([0.5, 0.4, 0.6, 0.45, 0.55, 1.0, 1.2, 0.3, 0.5])
    assert bootstrap_p_value(deltas, 0.5) == pytest.approx((2 + 1) / 10)
    assert bootstrap_p_value(deltas, 0.5, "greater") == pytest.approx((2 + 1) / 10)
    assert permutation_p_value(np.array([-0.6, 0.1, 0.2, 0.55]), 0.5) == pytest.approx(3 / 5)
    assert permutation_p_value(np.array([-0.6, 0.1, 0.2, 0.55]), 0.5, "greater") == pytest.approx(2 / 5)
    assert percentile_ci(np.arange(101.0), 0.1) == (5.0, 95.0)
    with pytest.raises(ValueError, match="alternative"):
        bootstrap_p_value(deltas, 0.5, "bigger")
