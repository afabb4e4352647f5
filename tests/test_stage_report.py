"""Stage 3 end to end on a small phantom: report LM, fine-tuning, test predictions, `cxpmrg generate`."""
import json
import shutil

import pandas as pd
import pytest

from cxpmrg_lib.cli import main
from cxpmrg_lib.data.phantom import write_phantom
from cxpmrg_lib.stages.generate import ReportGenerator
from cxpmrg_lib.stages import read_summary
from cxpmrg_lib.stages.report import FinetuneConfig, ReportLMStageConfig, finetune_report, pretrain_report_lm


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("data") / "phantom", studies=50, size=64, seed=5, workers=1)


@pytest.mark.slow
def test_finetune_report_smoke(phantom, tmp_path, capsys):
    runs = tmp_path / "runs"
    lm_run = pretrain_report_lm(ReportLMStageConfig(dataset_root=str(phantom), run_root=str(runs), max_steps=3,
                                                    batch_size=8))
    assert (lm_run / "lm" / "config.json").exists() and read_summary(lm_run)["steps"] == 3
    cfg = FinetuneConfig(dataset_root=str(phantom), run_root=str(runs), init="random", max_steps=2, batch_size=4,
                         val_studies=4, test_studies=4, num_beams=2, earlier_epochs=0.1)
    run = finetune_report(cfg)
    summary = read_summary(run)
    assert summary["steps"] == 2 and summary["test_studies"] == 4
    assert {"bleu4", "ce_f1"} <= set(summary["test_metrics"])
    preds = pd.read_csv(run / "predictions_test.csv")
    assert list(preds.columns) == ["study_id", "reference", "prediction"] and len(preds) == 4
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and "select" in evals[-1]["eval"]
    assert finetune_report(cfg) == run                      # cached
    trained = (run / "metrics.jsonl").read_text()
    from dataclasses import replace
    assert finetune_report(replace(cfg, test_studies=3)) == run   # other test settings: predictions only
    assert read_summary(run)["test_studies"] == 3 and len(pd.read_csv(run / "predictions_test.csv")) == 3
    assert (run / "metrics.jsonl").read_text() == trained and read_summary(run)["steps"] == 2

    image = next((phantom / "PNG").rglob("*.png"))
    report = ReportGenerator.from_pretrained(run).generate([image], num_beams=1)
    assert isinstance(report, str)
    assert main(["generate", "--run", str(run), str(image), "--json", "--beams", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["report"] == report
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["generate", "--run", str(run), str(junk)]) == 2
    assert "cannot load image" in capsys.readouterr().err

    # the shareable folder: hard links to the kept weights and the LM, a model card, and it loads alone
    export = run / "export"
    assert (export / "model.safetensors").stat().st_ino == (run / "best" / "model.safetensors").stat().st_ino
    card = (export / "README.md").read_text()
    for words in ("MambaXray-VL report generator", "random (ablation: no pre-training)", "| BLEU-4 |", "| CE F1 |",
                  "3 test studies", "ReportGenerator.from_pretrained", "The frozen language model is in `lm/`",
                  "same as this project (MIT)", "synthetic"):
        assert words in card, words
    moved = tmp_path / "shared" / "generator"
    shutil.copytree(export, moved)
    shutil.rmtree(runs)                                     # no run tree, no LM run: the folder is enough
    assert ReportGenerator.from_pretrained(moved).generate([image], num_beams=1) == report
    assert main(["generate", "--run", str(moved), str(image), "--json", "--beams", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"] == report
    (moved / "lm" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="pass lm_dir="):
        ReportGenerator.from_pretrained(moved)


@pytest.mark.slow
def test_cli_finetune_random_init(phantom, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["finetune", "--dataset-root", str(phantom), "--run-root", str(runs), "--init", "random",
                 "--max-steps", "1", "--batch-size", "4", "--beams", "1", "--test-studies", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "stage 3 done" in out and "BLEU-4" in out and "predictions_test.csv" in out
    assert len(list((runs / phantom.name / "tiny" / "report_lm").glob("*/summary.json"))) == 1


def test_a_random_encoder_is_drawn_from_the_runs_seed(phantom):
    """Stage 3 "w/o stages 1-2": the encoder's weights come from the config's seed, whatever the process drew
    from the global generator before (a worker that trained another run first gave the ablation other weights)."""
    import torch

    from cxpmrg_lib.stages.report import _encoder_for

    config = FinetuneConfig(dataset_root=str(phantom), init="random", seed=3)
    first, run = _encoder_for(config)
    torch.rand(1000)                                   # what another job in the same worker would have drawn
    second, _ = _encoder_for(config)
    assert run is None
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = _encoder_for(FinetuneConfig(dataset_root=str(phantom), init="random", seed=4))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
