"""The study-table contract: validation errors name the row and path; skip counts what it drops."""
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.table import STUDY_COLUMNS, note_dropped, safe_join, validate_study_table
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def table(root, n=4):
    rows = []
    for i in range(n):
        p = f"img/s{i}.png"
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / p)
        rows.append({"study_id": f"s{i}", "image_paths": [p], "findings": "f", "impression": "",
                     "report": "heart normal .", "split": ["train", "val", "test", "train"][i % 4],
                     **{c: np.nan for c in CHEXPERT_LABELS}})
    return pd.DataFrame(rows)


def test_columns_contract():
    assert STUDY_COLUMNS[:6] == ["study_id", "image_paths", "findings", "impression", "report", "split"]
    assert STUDY_COLUMNS[6:] == CHEXPERT_LABELS and len(STUDY_COLUMNS) == 20


def test_valid_table_passes(tmp_path):
    df = table(tmp_path)
    df.loc[0, "Cardiomegaly"] = -1.0
    out = validate_study_table(df, root=tmp_path)
    assert len(out) == 4 and out.attrs["dropped"] == {}
    assert out[CHEXPERT_LABELS].dtypes.eq(float).all() and out.loc[0, "Cardiomegaly"] == -1.0


def test_missing_columns_listed(tmp_path):
    df = table(tmp_path).drop(columns=["split", "Edema"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['split', 'Edema'\]"):
        validate_study_table(df, root=tmp_path)


@pytest.mark.parametrize("bad, reason", [
    ("../../etc/passwd", "path escapes the dataset root"),
    ("/etc/passwd", "path escapes the dataset root"),
    ("img/../../x.png", "path escapes the dataset root"),
    ("img/missing.png", "missing image file"),
])
def test_bad_paths(tmp_path, bad, reason):
    df = table(tmp_path)
    df.at[2, "image_paths"] = ["img/s2.png", bad]
    with pytest.raises(DataError, match=rf"1 bad row\(s\) \(1 {reason}\):\n  {reason}: row 2 \(study_id s2\)"):
        validate_study_table(df, root=tmp_path)
    out = validate_study_table(df, root=tmp_path, on_error="skip")
    assert list(out.study_id) == ["s0", "s1", "s3"] and out.attrs["dropped"] == {reason: 1}


def test_check_files_off_still_checks_escapes(tmp_path):
    df = table(tmp_path)
    df.at[1, "image_paths"] = ["img/missing.png"]
    assert len(validate_study_table(df, root=tmp_path, check_files=False)) == 4
    df.at[1, "image_paths"] = ["../x.png"]
    with pytest.raises(DataError, match="escapes"):
        validate_study_table(df, root=tmp_path, check_files=False)


def test_row_problems_counted(tmp_path, caplog):
    df = table(tmp_path, n=8)
    df.loc[1, "report"] = np.nan
    df.loc[2, "report"] = "  "
    df.loc[3, "split"] = "valid"
    df.loc[4, "Edema"] = 2.0
    df.loc[5, "study_id"] = "s0"
    df.at[6, "image_paths"] = []
    with pytest.raises(DataError) as e:
        validate_study_table(df, root=tmp_path)
    msg = str(e.value)
    assert "6 bad row(s)" in msg and "unknown split: row 3 (study_id s3): split='valid'" in msg
    assert "... and 1 more" in msg
    with caplog.at_level(logging.WARNING):
        out = validate_study_table(df, root=tmp_path, on_error="skip", source="t.csv")
    assert list(out.study_id) == ["s0", "s7"]
    assert out.attrs["dropped"] == {"empty report": 2, "unknown split": 1, "bad label value": 1,
                                    "duplicate study_id": 1, "no image path": 1}
    assert "dropped 6 row(s) from t.csv" in caplog.text


def test_single_path_string_is_wrapped(tmp_path):
    df = table(tmp_path)
    df["image_paths"] = [p[0] for p in df.image_paths]
    assert validate_study_table(df, root=tmp_path).image_paths[0] == ["img/s0.png"]


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert safe_join(tmp_path, "a/../b.png") == tmp_path / "b.png"
    for bad in ("../a.png", "/etc/passwd", "a/../../b", "C:\\x.png", "~/x.png", ""):
        with pytest.raises(DataError, match="absolute|escapes|empty"):
            safe_join(tmp_path, bad)


def test_note_dropped_sums(caplog):
    df = pd.DataFrame({"a": [1]})
    note_dropped(df, {"x": 2})
    note_dropped(df, {"x": 1, "y": 0, "z": 3})
    assert df.attrs["dropped"] == {"x": 3, "z": 3}


def test_note_dropped_says_each_drop_once(caplog, tmp_path, monkeypatch):
    """Reloading the same file (each split, each stage) warns once; a new drop or file warns again."""
    import logging
    caplog.set_level(logging.DEBUG, logger="cxpmrg_lib.data.table")
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "sub" / "reports.csv"
    for _ in range(3):
        note_dropped(pd.DataFrame({"a": [1]}), {"empty report": 2}, source=str(src))
    note_dropped(pd.DataFrame({"a": [1]}), {"empty report": 3}, source=str(src))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert warned == ["dropped 2 row(s) from sub/reports.csv: 2 empty report",
                      "dropped 3 row(s) from sub/reports.csv: 3 empty report"]
    assert len(debug) == 2
