"""The reproducibility chapter's library: run table, checksums, git state and rerun commands from files on disk."""
import hashlib
import json
import shlex

import pytest
import yaml

from cxpmrg_lib.chapters import reproducibility as repro


def _run(root, stage, h, config, summary=None, wall=None):
    d = root / "phantom_n60_96px_s0" / "tiny" / stage / h
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"config": config, "resolved": {"stage": stage, "train": {
        "epochs": config.get("epochs"), "batch_size": 16, "lr": 3e-4}}}))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if wall is not None:
        (d / "train_summary.json").write_text(json.dumps({"wall_s": wall}))
    return d


def _stage3_config(data, **kw):
    return {"dataset_root": str(data / "phantom_n60_96px_s0"), "dataset_kind": "auto", "preset": "tiny",
            "run_root": "runs", "epochs": None, "max_steps": None, "batch_size": None, "lr": None, "seed": 3,
            "loader": {"section": "findings", "split": "patient"}, "device": "cpu", "on_bad_image": "skip",
            "init": "stage2", "freeze_encoder": False, "lm_pretrained": None, "max_studies": None, "max_images": 2,
            "val_studies": 64, "test_studies": None, "num_beams": 3, "repetition_penalty": 2.0,
            "no_repeat_ngram_size": 3, "earlier_epochs": None, "checkpoint_every": 200, "projection_lr": 3e-3,
            "encoder_pretraining": "none", "encoder_pretraining_steps": 300, "pretrain_root": None,
            "pretrain_kind": "auto", "pretrain_loader": None, "decoding_choice": "validation", **kw}


def test_run_table_reads_every_run_and_says_what_is_missing(tmp_path):
    runs = tmp_path / "runs"
    assert "Run the notebooks `00_data`" in repro.missing_runs_message(runs)
    assert repro.run_table(runs).empty
    _run(runs, "autoregressive", "aaa111", {"seed": 0, "epochs": 1, "preset": "tiny"}, {"steps": 4}, wall=90.0)
    _run(runs, "finetune", "bbb222", _stage3_config(tmp_path), None)
    table = repro.run_table(runs).set_index("hash")
    assert repro.missing_runs_message(runs) is None
    assert table.loc["aaa111", ["stage", "status", "steps", "wall_min"]].tolist() == ["autoregressive", "finished", 4, 1.5]
    assert table.loc["bbb222", ["stage", "status", "seed", "init"]].tolist() == ["finetune", "unfinished", 3, "stage2"]
    assert repro.stage3_run(runs) is None          # unfinished runs are not rerun targets


def test_checksums_hash_the_index_file_and_count_images(tmp_path):
    tree = tmp_path / "iu"
    (tree / "images" / "s1").mkdir(parents=True)
    ann = json.dumps({"train": [{"id": "s1", "report": "clear.", "image_path": ["s1/0.png"], "split": "train"}],
                      "val": [], "test": []}).encode()
    (tree / "annotation.json").write_bytes(ann)
    for n in range(3):
        (tree / "images" / "s1" / f"{n}.png").write_bytes(b"x" * 10)
    table = repro.checksum_table([tree])
    assert table[["file", "sha256", "images"]].values.tolist() == [["annotation.json", hashlib.sha256(ann).hexdigest(), 3]]


def test_git_state_outside_a_checkout_is_not_an_error(tmp_path):
    state = repro.git_state(tmp_path)
    assert state["commit"] is None and "not a git checkout" in state["note"] or "git is not installed" in state["note"]


def test_manifests_name_every_licence():
    table = repro.manifest_table().set_index("manifest")
    assert not table.loc["chexpert_plus.yaml", "redistributable"] and not table.loc["mimic_cxr.yaml", "redistributable"]
    assert "CC BY-NC-ND 4.0" in table.loc["iu_xray.yaml", "licence"]


def test_the_cxpmrg_rerun_command_rebuilds_the_recorded_config(tmp_path):
    """Parsing the generated shell command gives back exactly the stage-3 config of the run (bar the run root)."""
    from cxpmrg_lib import cli
    from cxpmrg_lib.stages import FinetuneConfig

    config = _stage3_config(tmp_path, epochs=2.0, lr=1e-4, test_studies=16)
    run = _run(tmp_path / "runs", "finetune", "ccc333", config, {"test_metrics": {"bleu4": 0.125}})
    cmds = repro.rerun_commands(run, fresh_run_root="fresh")
    assert cmds["bleu4"] == 0.125 and not cmds["smoke"]
    # seed 3 on the seed-0 phantom: the notebooks' single `seed` cannot say that, so the tree is passed
    assert f"-p dataset_root {tmp_path / 'phantom_n60_96px_s0'}" in cmds["papermill_fresh"]
    assert "-p seed 3" in cmds["papermill_fresh"] and "-p run_root fresh" in cmds["papermill_fresh"]
    args = cli.build_parser().parse_args(shlex.split(cmds["cxpmrg"])[1:])
    got = FinetuneConfig(**cli._stage_common(args), init=args.init, lm_pretrained=args.lm_pretrained,
                         freeze_encoder=args.freeze_encoder, num_beams=args.beams, test_studies=args.test_studies,
                         decoding_choice=args.decoding)
    from dataclasses import asdict
    assert {**asdict(got), "run_root": "runs"} == config
    assert "--decoding" not in cmds["cxpmrg"] and "decoding_choice" not in cmds["papermill_fresh"]
    # a run recorded before the decoding choice existed (no key) was written with the fixed decoding
    old = {k: v for k, v in config.items() if k != "decoding_choice"}
    old_cmds = repro.rerun_commands(_run(tmp_path / "runs3", "finetune", "eee555", old, {"test_metrics": {"bleu4": 0.1}}))
    assert "--decoding fixed" in old_cmds["cxpmrg"] and "-p decoding_choice fixed" in old_cmds["papermill_fresh"]
    # a smoke run sets what the CLI has no flag for: no shell command, the reason instead
    smoke = _run(tmp_path / "runs2", "finetune", "ddd444", _stage3_config(tmp_path, seed=0, epochs=1, earlier_epochs=1,
                                                                        val_studies=8, test_studies=16), {})
    cmds = repro.rerun_commands(smoke)
    assert cmds["smoke"] and cmds["cxpmrg"] is None and set(cmds["cxpmrg_missing"]) == {"earlier_epochs", "val_studies"}
    assert "-p smoke True" in cmds["papermill_reuse"] and "-p phantom_studies 60 -p phantom_size 96" in cmds["papermill_reuse"]
    # the benchmark's matched row (the backbone step on MambaXray-VL's encoder) has no CLI flag either
    matched = _run(tmp_path / "runs4", "finetune", "fff666", _stage3_config(tmp_path, encoder_pretraining="labels"), {})
    assert set(repro.rerun_commands(matched)["cxpmrg_missing"]) == {"encoder_pretraining"}
    with pytest.raises(ValueError, match="not a stage-3"):
        repro.rerun_commands(_run(tmp_path / "runs3", "autoregressive", "eee555", {"seed": 0}, {}))
