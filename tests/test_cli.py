"""`cxpmrg data ...` end to end through the console entry point (main), as a user runs it."""
import json

import pandas as pd

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


def test_evaluate_command_prints_table_writes_json_and_runs_paired_test(tmp_path, capsys):
    refs = ["no pleural effusion . heart size is normal .", "small left pleural effusion .",
            "mild cardiomegaly . no pneumothorax .", "right lower lobe consolidation .",
            "the lungs are clear .", "moderate pulmonary edema ."] * 5
    good = list(refs)
    good[0] = "heart size is normal ."
    bad = ["the lungs are clear ."] * len(refs)
    ids = [f"s{i}" for i in range(len(refs))]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame({"study_id": ids, "reference": refs, "prediction": good}).to_csv(a, index=False)
    pd.DataFrame({"study_id": ids[::-1], "reference": refs[::-1], "prediction": bad}).to_csv(b, index=False)
    assert main(["evaluate", "--predictions", str(a), "--against", str(b), "--no-meteor",
                 "--n-boot", "200", "--method", "permutation"]) == 0
    text = capsys.readouterr().out
    assert "bleu4" in text and "ce_f1" in text
    result = json.loads((tmp_path / "a.metrics.json").read_text())
    assert result["metrics"]["bleu4"] > 0.8 and result["n_studies"] == len(refs)
    lo, hi = result["ci"]["bleu4"]
    assert lo <= result["metrics"]["bleu4"] <= hi
    flat = json.dumps(result)
    assert "p_value" in flat
    # a file without the prediction column is a clear error naming the file
    pd.DataFrame({"study_id": ids, "reference": refs}).to_csv(tmp_path / "c.csv", index=False)
    assert main(["evaluate", "--predictions", str(tmp_path / "c.csv"), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert "c.csv" in err and "prediction" in err


def test_python_m_cxpmrg_lib_is_the_cxpmrg_command(tmp_path):
    """`python -m cxpmrg_lib` takes the command's arguments and exit codes (a user error exits 2)."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "cxpmrg_lib", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "usage: cxpmrg" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "cxpmrg_lib", "data", "check", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr
