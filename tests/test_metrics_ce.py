"""CE metrics under the three conventions, against sklearn and hand-worked examples."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_recall_fscore_support

from cxpmrg_lib.metrics.ce import (CE_KEYS, ce_from_labels, ce_from_sums, ce_per_label, ce_scores, ce_stats,
                                   headline_keys)
from cxpmrg_lib.data.observations import CHEXPERT_LABELS, TOP5_LABELS

NAN = np.nan


def frame(rows):
    """Rows given as {label: value}; everything else NaN."""
    return pd.DataFrame([{**dict.fromkeys(CHEXPERT_LABELS, NAN), **r} for r in rows], columns=CHEXPERT_LABELS)


def random_labels(n, seed):
    rng = np.random.default_rng(seed)
    vals = rng.choice([1.0, 0.0, -1.0, NAN], size=(n, 14), p=[0.25, 0.25, 0.1, 0.4])
    vals[:, 3] = NAN  # a label never mentioned: exercises zero_division
    return pd.DataFrame(vals, columns=CHEXPERT_LABELS)


def test_r2gen_equals_sklearn_on_random_labels():
    ref, pred = random_labels(300, 1), random_labels(300, 2)
    pred.iloc[:, 5] = 1.0  # a label predicted everywhere
    got = ce_from_labels(ref, pred, "r2gen")
    y_true, y_pred = (ref.to_numpy() == 1).astype(int), (pred.to_numpy() == 1).astype(int)
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        assert got[f"{avg}_precision"] == pytest.approx(p, abs=1e-12)
        assert got[f"{avg}_recall"] == pytest.approx(r, abs=1e-12)
        assert got[f"{avg}_f1"] == pytest.approx(f, abs=1e-12)
    assert (got["precision"], got["recall"], got["f1"]) == (got["micro_precision"], got["micro_recall"],
                                                            got["micro_f1"])
    # the per-label table is sklearn's average=None
    table = ce_per_label(ref, pred, "r2gen")
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    np.testing.assert_allclose(table["precision"], p, atol=1e-12)
    np.testing.assert_allclose(table["recall"], r, atol=1e-12)
    np.testing.assert_allclose(table["f1"], f, atol=1e-12)
    np.testing.assert_array_equal(table["support"], s)
    assert table.loc["Lung Lesion", "support"] == 0 and table.loc["Lung Lesion", "f1"] == 0.0


def test_uncertain_positive_counts_minus_one_and_top5():
    ref, pred = random_labels(200, 3), random_labels(200, 4)
    got = ce_from_labels(ref, pred, "uncertain_positive")
    pos = lambda f: np.isin(f.to_numpy(), (1.0, -1.0)).astype(int)  # noqa: E731
    p, r, f, _ = precision_recall_fscore_support(pos(ref), pos(pred), average="micro", zero_division=0)
    assert got["micro_f1"] == pytest.approx(f, abs=1e-12) and got["f1"] == got["micro_f1"]
    top = [CHEXPERT_LABELS.index(x) for x in TOP5_LABELS]
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(pos(ref)[:, top], pos(pred)[:, top], average=avg,
                                                     zero_division=0)
        assert got[f"top5_{avg}_precision"] == pytest.approx(p, abs=1e-12)
        assert got[f"top5_{avg}_f1"] == pytest.approx(f, abs=1e-12)
    # different from r2gen on the same data, since -1 now counts
    assert got["micro_f1"] != pytest.approx(ce_from_labels(ref, pred, "r2gen")["micro_f1"])


def test_example_based_hand_worked():
    ref = frame([{"Edema": 1, "Cardiomegaly": 1},        # tp 1, fp 1, fn 1
                 {"Pneumonia": 1},                       # tp 0, fp 0, fn 1 -> P = 0/0 -> 0
                 {},                                     # nothing anywhere -> all 0
                 {"Fracture": 1, "Edema": -1}])          # -1 is not positive: tp 1
    pred = frame([{"Edema": 1, "Atelectasis": 1},
                  {"Pneumonia": 0},
                  {},
                  {"Fracture": 1, "Edema": 1}])          # Edema: fp (ref is uncertain)
    got = ce_from_labels(ref, pred, "example")
    # per report P: 1/2, 0, 0, 1/2; R: 1/2, 0, 0, 1; F1: 1/(1+1), 0, 0, 1/(1+0.5)
    assert got["precision"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
    assert got["recall"] == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert got["f1"] == pytest.approx((0.5 + 0 + 0 + 1 / 1.5) / 4)
    assert set(got) == {"precision", "recall", "f1"}


def test_headline_follows_convention_and_keys_are_stable():
    ref, pred = random_labels(50, 5), random_labels(50, 6)
    sums = ce_stats(ref.to_numpy(), pred.to_numpy()).sum(0)
    for conv, src in (("r2gen", "ce_r2gen_micro_f1"), ("example", "ce_example_f1"),
                      ("uncertain_positive", "ce_unc_micro_f1")):
        vals = ce_from_sums(sums, 50, conv)
        assert tuple(vals) == CE_KEYS
        assert vals["ce_f1"][0] == vals[src][0]
        assert headline_keys(conv)["ce_f1"] == src
    assert len(CE_KEYS) == 24 and len(set(CE_KEYS)) == 24


def test_frames_are_matched_by_study_index():
    ref = random_labels(20, 7)
    ref.index = [f"s{i}" for i in range(20)]
    pred = ref.sample(frac=1.0, random_state=0)  # same studies, shuffled rows
    got = ce_from_labels(ref, pred, "r2gen")
    assert got["micro_f1"] == 1.0 and got["macro_precision"] == pytest.approx(13 / 14)  # Lung Lesion: 0
    other = pred.rename(index={"s3": "s99"})
    with pytest.raises(ValueError, match="different studies.*s3"):
        ce_from_labels(ref, other)


def test_bad_label_frames_are_named():
    ref = frame([{"Edema": 1}])
    with pytest.raises(ValueError, match="pred_labels: missing label columns \\['Edema'\\]"):
        ce_from_labels(ref, ref.drop(columns=["Edema"]))
    bad = frame([{"Edema": 2}])
    with pytest.raises(ValueError, match="1 are not, e.g. row 0 column 'Edema' is 2"):
        ce_from_labels(ref, bad)
    with pytest.raises(ValueError, match="column 'Edema' is yes"):
        ce_from_labels(frame([{"Edema": "yes"}]), ref)
    with pytest.raises(ValueError, match="unknown CE convention 'chexbert'"):
        ce_from_labels(ref, ref, "chexbert")


def test_ce_scores_labels_both_sides_with_an_injected_labeler():
    seen = []

    def labeler(texts):
        seen.append(list(texts))
        return frame([{"Edema": 0.0} if "no edema" in t else {"Edema": 1.0} if "edema" in t else {}
                      for t in texts])

    got = ce_scores(["mild edema", "no edema", "edema"], ["edema", float("nan"), 7], labeler=labeler)
    # missing cells reach the labeller as "", numbers as text
    assert seen == [["mild edema", "no edema", "edema"], ["edema", "", "7"]]
    # tp 1 (row 0), fn 1 (row 2), fp 0
    assert got["precision"] == 1.0 and got["recall"] == 0.5 and got["f1"] == pytest.approx(2 / 3)


def test_ce_scores_rejects_a_labeler_with_the_wrong_row_count():
    with pytest.raises(ValueError, match="returned DataFrame with 1 rows for 2 references"):
        ce_scores(["a", "b"], ["a", "b"], labeler=lambda t: frame([{}]))


def test_default_labeler_is_the_project_labeller():
    # labeler=None uses cxpmrg_lib.labels.labeler.label_reports (imported only when CE is asked for)
    got = ce_scores(["Mild cardiomegaly. No pleural effusion.", "Possible left lower lobe atelectasis."],
                    ["Cardiomegaly is present.", "Left basal atelectasis."], convention="uncertain_positive")
    assert got["micro_precision"] == 1.0 and got["micro_recall"] == 1.0
    strict = ce_scores(["Mild cardiomegaly. No pleural effusion.", "Possible left lower lobe atelectasis."],
                       ["Cardiomegaly is present.", "Left basal atelectasis."])
    assert strict["precision"] == 0.5 and strict["recall"] == 1.0  # the uncertain one is negative in r2gen
