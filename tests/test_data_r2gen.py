"""R2Gen annotation.json loader on small hand-built trees."""
import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.r2gen import load_r2gen
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def item(i, split, n_images=2, report="The heart is normal. No effusion.", paths=None):
    return {"id": f"CXR{i}_IM-{i:04d}", "report": report, "split": split,
            "image_path": paths or [f"CXR{i}_IM-{i:04d}/{k}.png" for k in range(n_images)]}


def make_tree(root, ann=None, n_images=2):
    if ann is None:
        ann = {"train": [item(i, "train", n_images) for i in range(1, 4)],
               "val": [item(4, "val", n_images)], "test": [item(5, "test", n_images, report="Mild cardiomegaly.\n\nLungs clear ..")]}
    for it in [x for v in ann.values() for x in v]:
        for p in it["image_path"]:
            f = root / "images" / p
            if ".." in p or p.startswith("/"):
                continue
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(f)
    (root / "annotation.json").write_text(json.dumps(ann))
    return root


def test_iu_tree(tmp_path):
    make_tree(tmp_path)
    df = load_r2gen(tmp_path)
    assert df.attrs["dataset"] == "iu_xray" and df.attrs["clean"] == "iu"
    assert list(df.split) == ["train"] * 3 + ["val", "test"]
    assert df.iloc[0].image_paths == ["images/CXR1_IM-0001/0.png", "images/CXR1_IM-0001/1.png"]
    assert df.iloc[4].report == "mild cardiomegaly . lungs clear ."
    assert df.iloc[4].findings == "Mild cardiomegaly.\n\nLungs clear .." and df.iloc[4].impression == ""
    assert df[CHEXPERT_LABELS].isna().all().all()
    assert df.attrs["dropped"] == {}


def test_labels_csv(tmp_path):
    make_tree(tmp_path)
    pd.DataFrame({"study_id": ["CXR1_IM-0001", "CXR5_IM-0005"], "Cardiomegaly": [1.0, 0.0],
                  "Edema": [np.nan, -1.0]}).to_csv(tmp_path / "labels.csv", index=False)
    df = load_r2gen(tmp_path).set_index("study_id")
    assert df.loc["CXR1_IM-0001", "Cardiomegaly"] == 1.0 and df.loc["CXR5_IM-0005", "Edema"] == -1.0
    assert np.isnan(df.loc["CXR2_IM-0002", "Cardiomegaly"]) and np.isnan(df.loc["CXR1_IM-0001", "Fracture"])


def test_mimic_guess_and_clean(tmp_path):
    ann = {"train": [{"id": "abc", "report": "1. No acute process.\n2. ___ tube in place.", "split": "train",
                      "image_path": ["p10/p10000032/s50414267/abc.jpg"]}], "val": [], "test": []}
    make_tree(tmp_path, ann)
    df = load_r2gen(tmp_path)
    assert df.attrs["dataset"] == "mimic_cxr" and df.attrs["clean"] == "mimic"
    assert df.iloc[0].report == "no acute process . tube in place ."


def test_malformed_json_position(tmp_path):
    (tmp_path / "annotation.json").write_text('{"train": [\n  {"id": "a",}\n]}')
    with pytest.raises(DataError, match=r"annotation\.json: malformed JSON at line 2, column 14"):
        load_r2gen(tmp_path)


def test_missing_image_and_empty_report(tmp_path, caplog):
    make_tree(tmp_path)
    (tmp_path / "images/CXR2_IM-0002/1.png").unlink()
    ann = json.loads((tmp_path / "annotation.json").read_text())
    ann["val"][0]["report"] = "   "
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"(?s)2 bad row\(s\) \(1 missing image file, 1 empty report\).*missing image file: annotation.json train\[1\] \(id CXR2_IM-0002\): .*CXR2_IM-0002/1\.png.*empty report: annotation.json val\[0\]"):
        load_r2gen(tmp_path)
    with caplog.at_level(logging.WARNING):
        df = load_r2gen(tmp_path, on_error="skip")
    assert list(df.study_id) == ["CXR1_IM-0001", "CXR3_IM-0003", "CXR5_IM-0005"]
    assert df.attrs["dropped"] == {"missing image file": 1, "empty report": 1}
    assert "dropped 2 row(s)" in caplog.text


def test_escaping_paths(tmp_path):
    ann = {"train": [item(1, "train"), item(2, "train", paths=["../../../etc/passwd"]),
                     item(3, "train", paths=["/etc/passwd"])], "val": [], "test": []}
    make_tree(tmp_path, ann)
    with pytest.raises(DataError, match=r"escapes the dataset root"):
        load_r2gen(tmp_path)
    df = load_r2gen(tmp_path, on_error="skip", dataset="iu_xray")
    assert list(df.study_id) == ["CXR1_IM-0001"] and df.attrs["dropped"] == {"path escapes the dataset root": 2}


def test_non_utf8_annotation(tmp_path):
    make_tree(tmp_path)
    p = tmp_path / "annotation.json"
    p.write_bytes(p.read_bytes().replace(b"No effusion.", b"No \xe9ffusion \x96 ok.", 1))
    df = load_r2gen(tmp_path)
    assert df.iloc[0].findings == "The heart is normal. No \u00e9ffusion \u2013 ok."
    assert df.attrs["decoded_with_fallback"] == 1


def test_bad_structure(tmp_path):
    (tmp_path / "annotation.json").write_text('[1, 2]')
    with pytest.raises(DataError, match="expected a JSON object"):
        load_r2gen(tmp_path)
    (tmp_path / "annotation.json").write_text('{"training": []}')
    with pytest.raises(DataError, match="top-level keys must be train/val/test"):
        load_r2gen(tmp_path)
    (tmp_path / "annotation.json").write_text('{"train": [{"report": "x"}]}')
    with pytest.raises(DataError, match=r"train\[0\]: expected an object"):
        load_r2gen(tmp_path)
