"""CheXpert Plus loader on small hand-built trees in the native layout."""
import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxpmrg_lib.data.chexpert_plus import CHEXPERT_PLUS_COLUMNS, load_chexpert_plus, patient_split
from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def _row(path, pid, split, findings, impression, view="Frontal"):
    r = {c: "" for c in CHEXPERT_PLUS_COLUMNS}
    r.update(path_to_image=path, path_to_dcm=path.replace(".jpg", ".dcm"), frontal_lateral=view,
             ap_pa="PA" if view == "Frontal" else "", deid_patient_id=pid, section_findings=findings,
             section_impression=impression, split=split, age="63", sex="Female")
    return r


def make_tree(root, rows=None, write_images=True, labels=True):
    """Five studies of four patients; study 3 has no findings; study 1 has a lateral view."""
    if rows is None:
        rows = [
            _row("train/patient1/study1/view2_lateral.jpg", "patient1", "train", "Heart is normal.", "No acute disease.", "Lateral"),
            _row("train/patient1/study1/view1_frontal.jpg", "patient1", "train", "Heart is normal.", "No acute disease."),
            _row("train/patient1/study2/view1_frontal.jpg", "patient1", "train", "Small left effusion.", "Effusion."),
            _row("train/patient2/study1/view1_frontal.jpg", "patient2", "train", "", "Cardiomegaly."),
            _row("train/patient3/study1/view1_frontal.jpg", "patient3", "train", "Lungs clear.\n1. No pneumothorax.", ""),
            _row("valid/patient4/study1/view1_frontal.jpg", "patient4", "valid", "Stable lines.", "Tubes in place."),
        ]
    pd.DataFrame(rows, columns=CHEXPERT_PLUS_COLUMNS).to_csv(root / "df_chexpert_plus_240401.csv", index=False)
    if write_images:
        for r in rows:
            p = root / "PNG" / r["path_to_image"].replace(".jpg", ".png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), 100, np.uint8)).save(p)
    if labels:
        (root / "chexbert_labels").mkdir(exist_ok=True)
        for name, pos in (("findings", "Cardiomegaly"), ("impression", "Pleural Effusion")):
            with open(root / "chexbert_labels" / f"{name}_fixed.json", "w") as f:
                for r in rows:
                    rec = {"path_to_image": r["path_to_image"], **{k: None for k in CHEXPERT_LABELS}}
                    if "patient1/study2" in r["path_to_image"]:
                        rec[pos] = 1.0
                        rec["Edema"] = -1.0
                    if name == "impression" and "patient4" in r["path_to_image"]:
                        rec = {"path_to_image": r["path_to_image"], **{k: None for k in CHEXPERT_LABELS}}
                    f.write(json.dumps(rec) + "\n")
    return root


def test_findings_official(tmp_path):
    make_tree(tmp_path)
    df = load_chexpert_plus(tmp_path)
    assert list(df.study_id) == ["patient1/study1", "patient1/study2", "patient3/study1", "patient4/study1"]
    assert df.attrs["dropped"] == {"no findings text": 1}  # patient2 has no findings
    s1 = df.iloc[0]
    assert s1.image_paths == ["PNG/train/patient1/study1/view1_frontal.png", "PNG/train/patient1/study1/view2_lateral.png"]
    assert s1.views == ["Frontal", "Lateral"]
    assert s1.report == "heart is normal ."
    assert s1.findings == "Heart is normal." and s1.impression == "No acute disease."
    assert df.iloc[2].report == "lungs clear . no pneumothorax ."
    assert list(df.split) == ["train", "train", "train", "val"]
    s2 = df.iloc[1]
    assert s2["Cardiomegaly"] == 1.0 and s2["Edema"] == -1.0 and np.isnan(s2["Pleural Effusion"])
    assert df[CHEXPERT_LABELS].dtypes.eq(float).all()
    assert df.age.iloc[0] == 63.0 and df.patient_id.iloc[0] == "patient1"


def test_impression_and_both(tmp_path):
    make_tree(tmp_path)
    imp = load_chexpert_plus(tmp_path, section="impression")
    assert "patient2/study1" in set(imp.study_id) and "patient3/study1" not in set(imp.study_id)
    assert imp.set_index("study_id").loc["patient1/study2", "Pleural Effusion"] == 1.0
    assert np.isnan(imp.set_index("study_id").loc["patient1/study2", "Cardiomegaly"])
    both = load_chexpert_plus(tmp_path, section="both").set_index("study_id")
    assert len(both) == 5 and both.attrs["dropped"] == {}
    assert both.loc["patient1/study1", "report"] == "heart is normal . no acute disease ."
    # impression labels win where they exist ...
    assert both.loc["patient1/study2", "Pleural Effusion"] == 1.0 and np.isnan(both.loc["patient1/study2", "Cardiomegaly"])


def test_patient_split_is_deterministic_and_patient_level(tmp_path):
    ids = [f"patient{i}" for i in range(4000)]
    a, b = patient_split(ids, seed=0), patient_split(ids, seed=0)
    assert (a == b).all()
    frac = pd.Series(a).value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.03 and abs(frac["val"] - 0.1) < 0.02 and abs(frac["test"] - 0.2) < 0.03
    assert (patient_split(ids, seed=1) != a).mean() > 0.3
    make_tree(tmp_path)
    df = load_chexpert_plus(tmp_path, split="patient", seed=3)
    assert df.groupby("patient_id").split.nunique().max() == 1
    assert set(df.split) <= {"train", "val", "test"}


def test_missing_columns(tmp_path):
    make_tree(tmp_path)
    csv = tmp_path / "df_chexpert_plus_240401.csv"
    pd.read_csv(csv).drop(columns=["deid_patient_id", "section_findings"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['deid_patient_id', 'section_findings'\]"):
        load_chexpert_plus(tmp_path)


def test_missing_image_names_tried_paths(tmp_path, caplog):
    make_tree(tmp_path)
    (tmp_path / "PNG/train/patient3/study1/view1_frontal.png").unlink()
    with pytest.raises(DataError, match=r"data row 5: no image for 'train/patient3/study1/view1_frontal.jpg'; tried .*PNG/train/patient3/study1/view1_frontal.png"):
        load_chexpert_plus(tmp_path)
    with caplog.at_level(logging.WARNING):
        df = load_chexpert_plus(tmp_path, on_error="skip")
    assert "patient3/study1" not in set(df.study_id) and len(df) == 3
    assert df.attrs["dropped"] == {"missing image file": 1, "no findings text": 1}
    assert "1 missing image file" in caplog.text


def test_jpg_accepted(tmp_path):
    make_tree(tmp_path)
    png = tmp_path / "PNG/valid/patient4/study1/view1_frontal.png"
    png.rename(png.with_suffix(".jpg"))
    df = load_chexpert_plus(tmp_path)
    assert df.set_index("study_id").loc["patient4/study1", "image_paths"] == ["PNG/valid/patient4/study1/view1_frontal.jpg"]


def test_escaping_paths(tmp_path):
    rows = [_row("train/patient1/study1/view1_frontal.jpg", "patient1", "train", "Normal.", ""),
            _row("../../etc/passwd", "patient2", "train", "Normal.", ""),
            _row("/etc/passwd", "patient3", "train", "Normal.", "")]
    make_tree(tmp_path, rows=rows, write_images=False, labels=False)
    (tmp_path / "PNG/train/patient1/study1").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "PNG/train/patient1/study1/view1_frontal.png")
    with pytest.raises(DataError, match=r"data row 2: image path '\.\./\.\./etc/passwd' escapes the dataset root"):
        load_chexpert_plus(tmp_path)
    df = load_chexpert_plus(tmp_path, on_error="skip")
    assert list(df.study_id) == ["patient1/study1"]
    assert df.attrs["dropped"] == {"path escapes the dataset root": 2}
    assert df.iloc[0][CHEXPERT_LABELS].isna().all()  # no label files -> NaN


def test_non_utf8_csv(tmp_path):
    make_tree(tmp_path)
    csv = tmp_path / "df_chexpert_plus_240401.csv"
    csv.write_bytes(csv.read_bytes().replace(b"Lungs clear.", b"Lungs clear \x96 no \xe9ffusion."))
    df = load_chexpert_plus(tmp_path)
    assert df.attrs["decoded_with_fallback"] == 1
    assert df.set_index("study_id").loc["patient3/study1", "findings"].startswith("Lungs clear \u2013 no \u00e9ffusion.")


def test_malformed_label_line(tmp_path):
    make_tree(tmp_path)
    with open(tmp_path / "chexbert_labels/findings_fixed.json", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"findings_fixed\.json, line 7"):
        load_chexpert_plus(tmp_path)
    assert len(load_chexpert_plus(tmp_path, on_error="skip")) == 4


def test_no_csv(tmp_path):
    with pytest.raises(DataError, match="df_chexpert_plus_240401.csv"):
        load_chexpert_plus(tmp_path)
