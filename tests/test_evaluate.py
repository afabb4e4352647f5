"""`cxpmrg evaluate` logic: reading the CSV, bad files, the JSON written, the printed table."""
import json

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib import metrics
from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.metrics.evaluate import evaluate_file, format_evaluation, metrics_json_path, read_predictions
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def labeler(texts):
    words = {"edema": "Edema", "effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly"}
    return pd.DataFrame([{**dict.fromkeys(CHEXPERT_LABELS, np.nan),
                          **{lab: (0.0 if f"no {w}" in t else 1.0) for w, lab in words.items() if w in t}}
                         for t in texts], columns=CHEXPERT_LABELS)


REFS = ["mild edema . heart size is normal .", "no effusion . lungs are clear .", "cardiomegaly with small effusion .",
        "no edema . stable chest .", "small left effusion and mild edema .", "heart size is normal . no effusion ."]
GOOD = ["mild edema . heart is normal .", "no effusion . lungs clear .", "cardiomegaly and small effusion .",
        "no edema . stable chest .", "small effusion , mild edema .", "normal heart size . no effusion ."]
BAD = ["lungs are clear .", "", "heart size is normal .", "stable chest .", "no edema .", "cardiomegaly ."]


def write_csv(path, ids, refs, preds, **extra):
    pd.DataFrame({"study_id": ids, "reference": refs, "prediction": preds, **extra}).to_csv(path, index=False)
    return path


def test_evaluate_writes_json_and_table(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    a = write_csv(tmp_path / "good.csv", ids, REFS, GOOD, model="x")
    # the other file lists the same studies in another order
    b = write_csv(tmp_path / "bad.csv", ids[::-1], REFS[::-1], BAD[::-1])
    res = evaluate_file(a, against=b, meteor=False, n_boot=200, labeler=labeler)
    out = tmp_path / "good.metrics.json"
    assert res["output"] == str(out) and metrics_json_path(a) == out
    saved = json.loads(out.read_text())
    assert saved["metrics"]["meteor"] is None and saved["meteor_computed"] is False  # NaN -> null
    assert set(saved["metrics"]) == set(metrics.METRIC_KEYS)
    assert saved["n_studies"] == 6 and saved["n_empty_predictions"] == 0
    assert saved["against"]["n_empty_predictions"] == 1
    direct = metrics.score_reports(REFS, GOOD, meteor=False, labeler=labeler)
    assert saved["metrics"]["bleu4"] == pytest.approx(direct["bleu4"])
    other = metrics.score_reports(REFS, BAD, meteor=False, labeler=labeler)
    paired = saved["against"]["paired"]
    assert paired["bleu1"]["value_b"] == pytest.approx(other["bleu1"])
    assert paired["bleu1"]["delta"] == pytest.approx(direct["bleu1"] - other["bleu1"]) and paired["bleu1"]["delta"] > 0
    lo, hi = saved["ci"]["bleu1"]
    assert lo <= saved["metrics"]["bleu1"] <= hi
    labels = [row["label"] for row in saved["per_label"]]
    assert labels == CHEXPERT_LABELS
    edema = saved["per_label"][CHEXPERT_LABELS.index("Edema")]
    assert (edema["tp"], edema["support"]) == (2, 2)
    text = format_evaluation(res)
    assert "METEOR not computed" in text and "paired bootstrap test" in text
    assert "bleu4" in text and "95% CI" in text and "wrote" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert rows["bleu1"].endswith("A better")  # the paired line (printed after the CI line)
    assert rows["meteor"].endswith("not computed")


def test_nan_and_numeric_predictions(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("study_id,reference,prediction\n1,mild edema .,mild edema .\n2,no effusion .,\n3,cardiomegaly .,42\n")
    frame = read_predictions(path)
    assert frame["study_id"].tolist() == ["1", "2", "3"] and frame["prediction"].iloc[2] == "42"
    res = evaluate_file(path, meteor=False, n_boot=50, labeler=labeler, write=False)
    assert res["n_empty_predictions"] == 1 and "output" not in res
    assert not (tmp_path / "p.metrics.json").exists()


def test_missing_columns_name_the_file(tmp_path):
    path = write_csv(tmp_path / "x.csv", ["1"], ["a"], ["b"]).with_name("y.csv")
    pd.DataFrame({"id": ["1"], "reference": ["a"], "generated": ["b"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"y\.csv: missing column\(s\) \['study_id', 'prediction'\]"):
        read_predictions(path)
    with pytest.raises(DataError, match="not found"):
        read_predictions(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: not a readable CSV"):
        read_predictions(tmp_path / "empty.csv")


def test_duplicate_and_missing_ids_and_empty_references(tmp_path):
    dup = write_csv(tmp_path / "d.csv", ["a", "b", "a", "c", "c"], ["r"] * 5, ["p"] * 5)
    with pytest.raises(DataError, match=r"2 study_id value\(s\) appear more than once \(4 rows\): 'a', 'c'"):
        read_predictions(dup)
    noid = write_csv(tmp_path / "n.csv", ["a", None], ["r", "r"], ["p", "p"])
    with pytest.raises(DataError, match=r"without a study_id \(CSV lines 3\)"):
        read_predictions(noid)
    noref = write_csv(tmp_path / "r.csv", ["a", "b"], ["r", None], ["p", "p"])
    with pytest.raises(DataError, match="1 study/studies with an empty reference: 'b'"):
        read_predictions(noref)


def test_against_with_other_studies_or_references_is_an_error(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["1", "2", "3"], REFS[:3], GOOD[:3])
    b = write_csv(tmp_path / "b.csv", ["1", "2", "4"], REFS[:3], BAD[:3])
    with pytest.raises(DataError, match=r"1 study_id\(s\) only in .*a.csv \('3'\), 1 only in .*b.csv \('4'\); 2 shared"):
        evaluate_file(a, against=b, meteor=False, n_boot=10, labeler=labeler)
    c = write_csv(tmp_path / "c.csv", ["1", "2", "3"], [REFS[0], "something else", REFS[2]], BAD[:3])
    with pytest.raises(DataError, match="different references for 1 study/studies: '2'"):
        evaluate_file(a, against=c, meteor=False, n_boot=10, labeler=labeler)
    assert not (tmp_path / "a.metrics.json").exists()  # nothing written on error


def test_evaluate_with_meteor(tmp_path):
    # Needs Java (fails with install instructions where it is missing); reuses the shared JVM.
    a = write_csv(tmp_path / "m.csv", [f"s{i}" for i in range(6)], REFS, GOOD)
    res = evaluate_file(a, meteor=True, n_boot=100, labeler=labeler)
    assert res["meteor_computed"] is True and 0.3 < res["metrics"]["meteor"] < 1
    lo, hi = res["ci"]["meteor"]
    assert lo <= res["metrics"]["meteor"] <= hi
    assert "METEOR not computed" not in format_evaluation(res)
