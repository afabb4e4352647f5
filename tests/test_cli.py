"""`cxpmrg data ...` end to end through the console entry point (main), as a user runs it."""
import json

import pandas as pd
import pytest

from cxpmrg_lib.cli import main


def test_data_phantom_then_check(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantom", "--out", str(out), "--studies", "24", "--size", "64", "--seed", "3"]) == 0
    assert "24-study phantom" in capsys.readouterr().out
    csv = pd.read_csv(out / "df_chexpert_plus_240401.csv")
    assert csv["deid_patient_id"].nunique() <= 24 and len(csv) >= 24
    assert main(["data", "check", str(out), "--split", "patient"]) == 0
    text = capsys.readouterr().out
    assert "chexpert_plus" in text and "label prevalence" in text
    assert main(["data", "check", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "chexpert_plus"
    # a second write into the same non-empty folder is refused, and the first tree is intact
    assert main(["data", "phantom", "--out", str(out), "--studies", "5", "--size", "64"]) == 2
    assert "exists" in capsys.readouterr().err
    assert len(pd.read_csv(out / "df_chexpert_plus_240401.csv")) == len(csv)


def test_data_iu_phantom_with_limit(tmp_path, capsys):
    out = tmp_path / "iu"
    assert main(["data", "iu-phantom", "--out", str(out), "--limit", "30", "--size", "64"]) == 0
    assert "MeSH terms" in capsys.readouterr().out
    ann = json.loads((out / "annotation.json").read_text())
    items = [it for split in ann.values() for it in split]
    assert 25 <= len(items) <= 30  # reports with neither findings nor impression are left out
    assert all(len(it["image_path"]) == 2 for it in items)
    assert main(["data", "check", str(out)]) == 0
    assert "r2gen" in capsys.readouterr().out


def test_check_on_missing_root_is_a_clear_error(tmp_path, capsys):
    code = main(["data", "check", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
