"""Stage 1 end to end on a small phantom: the run folder, caching by config hash, the probe."""
import json

import numpy as np
import pytest
import torch

from cxpmrg_lib.data.dataset import collate_studies
from cxpmrg_lib.data.phantom import write_phantom
from cxpmrg_lib.stages.probe import probe_auroc, probe_autoregressive, probe_table
from cxpmrg_lib.stages.studies import load_split, load_studies
from cxpmrg_lib.stages import (AutoregressiveConfig, autoregressive_examples, config_hash, load_autoregressive,
                               pretrain_autoregressive, read_summary)
from cxpmrg_lib.models.ssm import compiled_available
from cxpmrg_lib.trainer import read_metrics

# the path a stage run's summary must name: the compiled kernel wherever it builds (CI builds it)
_SCAN_RAN = "compiled" if compiled_available() else "pytorch"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("data") / "phantom", studies=60, size=96, seed=3, workers=1)


def test_load_split_caches_frontal_images_in_memory(phantom):
    images, table = load_split(phantom, 128, "train")
    assert len(images) == len(table) == (table["split"] == "train").sum() > 20
    x = images[0]
    assert x.shape == (1, 128, 128) and x.dtype == torch.float32
    assert -1.0 <= x.min() < x.max() <= 1.0
    with pytest.raises(ValueError, match="no studies in split 'nope'"):
        load_split(phantom, 128, "nope")


def test_load_studies_keeps_views_reports_and_labels(phantom):
    studies, table = load_studies(phantom, 64, "val", max_images=2)
    item = studies[0]
    assert item["image"].shape == (2, 1, 64, 64) and item["image_mask"].tolist() == [True, False]
    assert item["report"] == table["report"].iloc[0] and item["labels"].shape == (14,)
    batch = collate_studies([studies[0], studies[1]])
    assert batch["image"].shape == (2, 2, 1, 64, 64) and batch["report"] == list(table["report"].iloc[:2])


def test_pretrain_autoregressive_runs_caches_and_reloads(phantom, tmp_path):
    cfg = AutoregressiveConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), max_steps=3,
                               batch_size=8, seed=0, checkpoint_every=2)
    run_dir = pretrain_autoregressive(cfg)
    assert run_dir.parent.name == "autoregressive" and run_dir.parents[1].name == "tiny"
    assert run_dir.parents[2].name == phantom.name
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/model.safetensors", "model/config.json"):
        assert (run_dir / name).exists(), name
    summary = read_summary(run_dir)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert summary["scan_impl"] == _SCAN_RAN                 # the summary says which scan trained it (1-way)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == 3

    # same config: reused without training (the metrics file is untouched)
    stamp = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    assert pretrain_autoregressive(cfg) == run_dir
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamp
    # another setting: another run folder; run_root and device are not part of the hash
    other = AutoregressiveConfig(**{**cfg.__dict__, "seed": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert pretrain_autoregressive(other) != run_dir

    model = load_autoregressive(run_dir)
    ex = autoregressive_examples(model, phantom, n=2)
    assert ex["prediction"].shape == (2, 1, 128, 128)
    assert json.loads((run_dir / "model" / "config.json").read_text())["encoder"]["dim"] == 128


def test_probe_scores_informative_features_above_random():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 14)) < 0.3).astype(float)
    y[:, 12] = np.nan                                     # a label never known: not scored
    informative = y[:, :3] * 3.0 + rng.normal(size=(400, 3))
    noise = rng.normal(size=(400, 8))
    good = probe_auroc(np.c_[informative, noise][:300], y[:300], np.c_[informative, noise][300:], y[300:])
    bad = probe_auroc(noise[:300], y[:300], noise[300:], y[300:])
    table = good.per_label.set_index("label")
    assert table["auroc"].iloc[:3].min() > 0.85
    assert np.isnan(table["auroc"].iloc[12])
    assert 0.35 < bad.mean_auroc < 0.65
    assert good.mean_auroc > bad.mean_auroc


def test_probe_autoregressive_compares_with_random_init(phantom, tmp_path):
    cfg = AutoregressiveConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), max_steps=1,
                               batch_size=8)
    results = probe_autoregressive(pretrain_autoregressive(cfg), phantom, test_split="val")
    assert set(results) == {"stage 1 (autoregressive)", "random init"}
    table = probe_table(results)
    assert list(table.columns) == ["mean AUROC", "labels scored"]


def test_pretrain_contrastive_from_stage1_and_random(phantom, tmp_path):
    from cxpmrg_lib.stages import ContrastiveConfig, load_contrastive, pretrain_contrastive

    common = dict(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), max_steps=2, batch_size=8,
                  checkpoint_every=0)
    run = pretrain_contrastive(ContrastiveConfig(**common, init="stage1", stage1_epochs=0.1))
    summary = read_summary(run)
    assert summary["steps"] == 2 and summary["stage1_run"] is not None
    assert summary["scan_impl"] == _SCAN_RAN                 # 4-way: the merged mixer's compiled core too
    assert read_summary(summary["stage1_run"])["stage"] == "autoregressive"
    for split in ("val", "test"):
        r = summary["retrieval"][split]
        assert 0 <= r["i2t_R@1"] <= r["i2t_R@5"] <= r["i2t_R@10"] <= 100 and r["n"] > 5
    for name in ("text_encoder/config.json", "tokenizer", "model/model.safetensors", "metrics.jsonl"):
        assert (run / name).exists(), name
    model = load_contrastive(run)
    assert model.image_encoder.config.scan == "4-way"
    ablation = pretrain_contrastive(ContrastiveConfig(**common, init="random"))
    assert ablation != run and read_summary(ablation)["stage1_run"] is None
    assert pretrain_contrastive(ContrastiveConfig(**common, init="random")) == ablation   # cached


def test_cli_pretrain_contrastive_and_unfinished_stage1(phantom, tmp_path, capsys):
    from cxpmrg_lib.cli import main
    from cxpmrg_lib.util.errors import RunError
    from cxpmrg_lib.stages import four_way_encoder

    runs = tmp_path / "runs"
    args = ["--dataset-root", str(phantom), "--run-root", str(runs), "--max-steps", "1", "--batch-size", "4",
            "--device", "cpu"]
    assert main(["pretrain", "contrastive", *args, "--init", "random"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 done" in out and "i2t_R@1" in out
    # a stage-1 run that was interrupted (no summary.json) cannot seed stage 2: said plainly
    half = runs / "half"
    half.mkdir()
    (half / "config.yaml").write_text("config: {preset: tiny}\nresolved: {stage: autoregressive}\n")
    with pytest.raises(RunError, match="unfinished stage-1"):
        four_way_encoder("tiny", half)


def test_stage_runs_are_the_runs_of_the_stage(phantom, tmp_path):
    """contrastive_runs and finetune_runs (02's and 03's notebooks) return what the stage function called
    alone finds (same hashed folders, finished). One job here (test_bench and test_parallel run the
    worker processes); what a worker gets must pickle."""
    import pickle
    from functools import partial

    from cxpmrg_lib.stages import (ContrastiveConfig, FinetuneConfig, contrastive_runs, finetune_runs,
                                   finetune_report, pretrain_contrastive)

    common = dict(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), max_steps=1, batch_size=4,
                  checkpoint_every=0, device="cpu")
    configs = {"stage 1 + 2": ContrastiveConfig(**common, init="stage1", stage1_epochs=0.1),
               "random": ContrastiveConfig(**common, init="random")}
    runs = contrastive_runs(configs, jobs=1)
    assert list(runs) == list(configs) and runs["stage 1 + 2"] != runs["random"]
    for name, config in configs.items():
        assert pretrain_contrastive(config) == runs[name] and read_summary(runs[name])["steps"] == 1
    stage3 = {init: FinetuneConfig(**common, init=init, earlier_epochs=0.1, val_studies=4, test_studies=4,
                                   num_beams=1) for init in ("random", "stage1")}
    done = finetune_runs(stage3, jobs=1)
    for init, config in stage3.items():
        assert finetune_report(config) == done[init] and read_summary(done[init])["test_studies"] == 4
        job = pickle.loads(pickle.dumps(partial(finetune_report, config)))
        assert job.args[0] == config


def test_report_lm_budget_is_in_steps_and_epochs_replace_it(tmp_path):
    """The report LM gets the same steps on any dataset (6 epochs gave the iu-phantom's 280 reports 53 steps)."""
    from cxpmrg_lib.presets import REPORT_LM_STEPS
    from cxpmrg_lib.stages.report import ReportLMStageConfig
    from cxpmrg_lib.trainer import TrainConfig, total_steps_for

    settings = ReportLMStageConfig(dataset_root=str(tmp_path)).train_settings()
    assert settings["max_steps"] == REPORT_LM_STEPS and "epochs" not in settings
    assert total_steps_for(TrainConfig(**settings), 280) == total_steps_for(TrainConfig(**settings), 1039) == 195
    by_epochs = ReportLMStageConfig(dataset_root=str(tmp_path), epochs=1).train_settings()
    assert by_epochs["epochs"] == 1 and "max_steps" not in by_epochs      # smoke runs: a short LM


def test_stage3_budget_is_in_steps_and_epochs_replace_it(tmp_path):
    from cxpmrg_lib.presets import STAGE3_STEPS
    from cxpmrg_lib.stages.report import FinetuneConfig, projection_lr_scale, validation_every

    settings = FinetuneConfig(dataset_root=str(tmp_path)).train_settings()
    assert settings["max_steps"] == STAGE3_STEPS and "epochs" not in settings
    # the same steps whatever the dataset size; validations evenly spaced, the last at the end
    assert validation_every(settings, 500) == validation_every(settings, 5000) == STAGE3_STEPS // 4
    by_epochs = FinetuneConfig(dataset_root=str(tmp_path), epochs=3).train_settings()
    assert by_epochs["epochs"] == 3 and "max_steps" not in by_epochs
    assert validation_every(by_epochs, 160) == (3 * 160 // 16) // 4
    assert projection_lr_scale(3e-3, settings) == pytest.approx(3e-3 / settings["lr"])
    assert projection_lr_scale(None, settings) == 1.0
