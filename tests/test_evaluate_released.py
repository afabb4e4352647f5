"""`cxpmrg evaluate-released` end to end on the CPU: random released-format stage-2/3 files at a tiny size, the
tiny Llama folder of tests/test_released_report.py, a small R2Gen tree (IU-like: two views a study)."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_released_report import files, llm_dir  # noqa: E402,F401  (module-scoped fixtures)

from cxpmrg_lib.cli import main  # noqa: E402

REPORTS = ["The heart is normal size. The lungs are clear.", "Mild cardiomegaly. No pleural effusion.",
           "Small left pleural effusion. No pneumothorax.", "Lungs are clear. No effusion."]


def r2gen_tree(root: Path, n_test: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    ann = {"train": [], "val": [], "test": []}
    for i in range(n_test + 2):
        split = "train" if i == 0 else "val" if i == 1 else "test"
        sid = f"CXR{i + 1}_IM-{i + 1:04d}"
        paths = [f"{sid}/{k}.png" for k in range(2)]
        for p in paths:
            (root / "images" / p).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / "images" / p)
        ann[split].append({"id": sid, "report": REPORTS[i % len(REPORTS)], "split": split, "image_path": paths})
    (root / "annotation.json").write_text(json.dumps(ann))
    return [it["id"] for it in ann["test"]]


def test_evaluate_released_writes_a_benchmark_row_and_resumes(files, llm_dir, tmp_path, capsys):
    s2, s3, _, _ = files
    ids = r2gen_tree(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["evaluate-released", "--stage2", str(s2), "--stage3", str(s3), "--lm", str(llm_dir),
            "--dataset-root", str(tmp_path / "data"), "--out", str(out), "--device", "cpu", "--beams", "1",
            "--min-new-tokens", "3", "--max-new-tokens", "5", "--n-boot", "50", "--no-meteor"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "iu profile: greedy, rp 2" in printed and "3-5 new tokens" in printed   # an IU tree, overridden
    preds = pd.read_csv(out / "predictions" / "mambaxray-vl-released.csv", dtype=str, keep_default_na=False)
    assert list(preds.columns) == ["study_id", "reference", "prediction"]
    assert list(preds["study_id"]) == ids and (preds["prediction"].str.split().str.len() >= 1).all()
    assert not (out / "predictions" / "mambaxray-vl-released.partial.csv").exists()
    result = json.loads((out / "predictions" / "mambaxray-vl-released.metrics.json").read_text())
    assert result["n_studies"] == 3 and result["n_boot"] == 50
    for key in ("bleu4", "ce_f1", "rouge_l", "cider"):
        assert key in result["metrics"] and len(result["ci"][key]) == 2
    lo, hi = result["ci"]["bleu4"]
    assert lo <= result["metrics"]["bleu4"] <= hi
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["system"] == "mambaxray-vl-released" and row["n_test"] == 3 and row["profile"] == "iu"
    assert {"bleu4_lo", "bleu4_hi", "ce_f1_lo", "ce_f1_hi", "reports_per_s"} <= set(row.index)
    # batched studies give the reports of ReportGenerator.from_released, one study (both views) at a time
    from cxpmrg_lib.stages.generate import ReportGenerator

    gen = ReportGenerator.from_released(s3, llm_dir, stage2=s2)
    for sid, report in zip(ids, preds["prediction"]):
        views = sorted((tmp_path / "data" / "images" / sid).glob("*.png"))
        assert gen.generate(views, num_beams=1, min_new_tokens=3, max_new_tokens=5) == report, sid

    # a crash after two studies: the partial file's reports are kept, only the third is generated
    partial = preds.iloc[:2].assign(prediction=["kept one", "kept two"])
    partial.to_csv(out / "predictions" / "mambaxray-vl-released.partial.csv", index=False)
    (out / "predictions" / "mambaxray-vl-released.csv").unlink()
    assert main(argv) == 0
    again = pd.read_csv(out / "predictions" / "mambaxray-vl-released.csv", dtype=str, keep_default_na=False)
    assert list(again["prediction"]) == ["kept one", "kept two", preds["prediction"].iloc[2]]
    # other settings (here the decoding) start afresh
    (out / "predictions" / "mambaxray-vl-released.csv").unlink()
    partial.to_csv(out / "predictions" / "mambaxray-vl-released.partial.csv", index=False)
    assert main(argv[:-5] + ["--max-new-tokens", "4", "--n-boot", "50", "--no-meteor", "--limit", "2"]) == 0
    fresh = pd.read_csv(out / "predictions" / "mambaxray-vl-released.csv", dtype=str, keep_default_na=False)
    assert list(fresh["study_id"]) == ids[:2] and "kept one" not in set(fresh["prediction"])


def test_evaluate_released_names_the_file_at_fault(files, llm_dir, tmp_path, capsys):
    from transformers import ViTConfig

    s2, s3, _, _ = files
    r2gen_tree(tmp_path / "data", n_test=1)
    base = ["evaluate-released", "--dataset-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--device", "cpu"]
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    assert main(base + ["--stage3", str(not_a_checkpoint), "--lm", str(llm_dir)]) == 2
    assert "notes.pth: not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert main(base + ["--stage3", str(tmp_path / "missing.pth"), "--lm", str(llm_dir)]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(base + ["--stage3", str(s2), "--lm", str(llm_dir)]) == 2     # a stage-2 file has no llama_proj
    assert "clip.pth: missing 'llama_proj.weight'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(base + ["--stage3", str(s3), "--lm", str(empty)]) == 2
    assert f"{empty}: not a transformers model folder (no config.json)" in capsys.readouterr().err
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(vit)
    assert main(base + ["--stage3", str(s3), "--lm", str(vit)]) == 2
    assert f"{vit}: a 'vit' model, not a causal LM" in capsys.readouterr().err


def test_released_decoding_profiles():
    from cxpmrg_lib.stages.released_eval import released_decoding

    assert released_decoding("auto", "iu_xray") == ("iu", dict(num_beams=5, min_new_tokens=40, max_new_tokens=100,
                                                               repetition_penalty=2.0, length_penalty=2.0))
    for dataset in ("mimic_cxr", "chexpert_plus", None):
        assert released_decoding("auto", dataset) == ("default", dict(num_beams=3, min_new_tokens=80, max_new_tokens=120,
                                                                      repetition_penalty=2.0, length_penalty=2.0))
    assert released_decoding("iu", "mimic_cxr", {"num_beams": 2, "max_new_tokens": None})[1]["num_beams"] == 2
    assert released_decoding("iu", None, {"max_new_tokens": None})[1]["max_new_tokens"] == 100
    with pytest.raises(ValueError, match="profile"):
        released_decoding("mimic")
