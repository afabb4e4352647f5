"""The benchmark end to end on a small phantom: three systems, a few steps, one protocol."""
import json
from pathlib import Path

import pandas as pd
import pytest

from cxpmrg_lib.bench import SYSTEMS, BenchConfig, backbone_steps_table, ranked_table, read_results, run_bench
from cxpmrg_lib.data.phantom import write_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("bench") / "phantom", studies=50, size=64, seed=7, workers=1)


def test_backbone_pretraining_is_checked_and_part_of_the_protocol(phantom):
    with pytest.raises(ValueError, match="backbone_pretraining must be one of"):
        BenchConfig(dataset_root="x", backbone_pretraining="imagenet")
    root = str(phantom)
    labels = BenchConfig(dataset_root=root).protocol()
    assert labels["backbone"] == {"pretraining": "labels", "steps": 600}
    assert "backbone" not in BenchConfig(dataset_root=root, backbone_pretraining="none").protocol()   # the old one
    assert BenchConfig(dataset_root=root, backbone_steps=10).protocol() != labels
    # the notebooks' parameter: the old 300 steps one parameter away, the smoke run's own few steps
    from cxpmrg_lib.bench import notebook_config

    assert notebook_config(root).protocol()["backbone"] == labels["backbone"]
    assert notebook_config(root, backbone_steps=300).protocol()["backbone"]["steps"] == 300
    assert notebook_config(root, smoke=True, backbone_steps=300).backbone_steps == 4


def test_the_upstream_runs_training_is_part_of_the_protocol(phantom, monkeypatch):
    """A row is keyed by how the runs it builds on are trained: a row fitted on a report LM of another
    budget is not reused (the iu-phantom's rows on its 53-step LM were, before)."""
    import dataclasses
    from cxpmrg_lib import presets

    before = BenchConfig(dataset_root=str(phantom)).protocol()
    assert before["upstream"]["report_lm"]["max_steps"] == presets.REPORT_LM_STEPS
    tiny = presets.PRESETS["tiny"]
    monkeypatch.setitem(presets.PRESETS, "tiny", dataclasses.replace(tiny, lm_stage={**tiny.lm_stage, "max_steps": 53}))
    assert BenchConfig(dataset_root=str(phantom)).protocol() != before


def test_unknown_system_is_refused():
    with pytest.raises(ValueError, match="unknown system"):
        BenchConfig(dataset_root="x", systems=["r2gen", "gpt-5"])
    with pytest.raises(ValueError, match="unknown system"):
        BenchConfig(dataset_root="x", redo=["r2gen-v2"])


@pytest.mark.slow
def test_smoke_bench_four_systems(phantom, tmp_path):
    cfg = BenchConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), device="cpu", max_steps=2,
                      batch_size=4, val_studies=4, test_studies=6, earlier_epochs=0.1, n_boot=50, speed_studies=4,
                      systems=["most-common", "cvt2gpt2", "transformer", "mambaxray-vl"], num_beams=2,
                      lm_epochs=0.2, jobs=2, backbone_steps=3)
    out = run_bench(cfg)          # two worker processes; the cvt2gpt2 row's GPT-2 LM is an earlier-stage job
    table = read_results(out)
    # the reference first, then the registry's order
    assert list(table["system"]) == ["mambaxray-vl", "most-common", "transformer", "cvt2gpt2"]
    for key in ("bleu4", "bleu4_lo", "bleu4_hi", "ce_f1", "train_min", "trainable_m", "total_m",
                "reports_per_s", "peak_mib", "p_bleu4", "p_ce_f1"):
        assert key in table.columns, key
    n = int(table["n_test"].iloc[0])
    assert table["n_test"].eq(n).all() and 3 <= n <= 6
    ref = table.set_index("system")
    assert pd.isna(ref.loc["mambaxray-vl", "p_bleu4"]) and not pd.isna(ref.loc["transformer", "p_bleu4"])
    assert ref.loc["transformer", "trainable_m"] > 0 and ref.loc["most-common", "trainable_m"] == 0
    assert ref.loc["mambaxray-vl", "total_m"] > ref.loc["mambaxray-vl", "trainable_m"]   # the frozen LM
    assert ref.loc["cvt2gpt2", "pretrain_min"] > 0          # its GPT-2 warm start is a report LM trained first
    assert ref.loc["cvt2gpt2", "trainable_m"] == ref.loc["cvt2gpt2", "total_m"]   # the whole decoder trains
    # the from-scratch backbones were pre-trained first (the protocol's ImageNet stand-in), and it is counted
    for slug in ("transformer", "cvt2gpt2"):
        record = json.loads((Path(ref.loc[slug, "run_dir"]) / "backbone_pretraining.json").read_text())
        assert record["objective"] == "labels" and record["steps"] == 3
        assert "backbone first trained on the training findings" in ref.loc[slug, "note"]
    assert ref.loc["transformer", "pretrain_min"] > 0
    steps = backbone_steps_table(table)
    assert set(steps.index) == set(ref.loc[["transformer", "cvt2gpt2"], "name"])
    assert (steps["steps"] == 3).all() and (steps["prior loss"] > 0).all()
    for slug in ("most-common", "transformer", "mambaxray-vl", "cvt2gpt2"):
        preds = pd.read_csv(out / "predictions" / f"{slug}.csv")
        assert list(preds.columns) == ["study_id", "reference", "prediction"] and len(preds) == n
    common = pd.read_csv(out / "predictions" / "most-common.csv")["prediction"]
    assert common.nunique() == 1
    # a rerun skips finished rows
    mtime = (out / "results.csv").stat().st_mtime_ns
    assert run_bench(cfg) == out and (out / "results.csv").stat().st_mtime_ns == mtime
    from dataclasses import replace
    run_bench(replace(cfg, redo=["most-common"], jobs=1))             # asked for: that row is redone, in-process
    assert (out / "results.csv").stat().st_mtime_ns != mtime and len(read_results(out)) == 4
    shown = ranked_table(table)
    assert shown.shape == (4, 7) and sum("<b>" in c for c in shown["bleu4"]) >= 1
    # the diagnostics read every trained row's validation records back from its run folder
    from cxpmrg_lib.chapters import diagnostics
    from cxpmrg_lib.bench import encoder_spread

    curves = diagnostics.validation_curves(dict(zip(table["name"], table["run_dir"])))
    assert set(curves["system"]) == set(ref.loc[["transformer", "cvt2gpt2", "mambaxray-vl"], "name"])
    assert {"ce_f1", "bleu4", "distinct", "pos:Cardiomegaly", "ref:Cardiomegaly"} <= set(curves.columns)
    spread = encoder_spread(cfg, ["transformer", "most-common"])
    assert list(spread.index) == [ref.loc["transformer", "name"]]          # word-level systems only
    assert spread.iloc[0]["spread (trained)"] > 0 and spread.iloc[0]["cosine (trained)"] < 1
    assert set(SYSTEMS) >= {"r2gen", "r2gencmn", "lm-qwen2"}


def test_diversity_and_plain_summary_name_the_collapsed_and_the_winners(tmp_path):
    from cxpmrg_lib.bench import notebook_config, plain_summary, report_diversity

    refs = [f"finding {i % 4} is present ." for i in range(40)]
    preds = {"most-common": ["finding 0 is present ."] * 40, "nearest-neighbour": refs,
             "r2gen": ["finding 0 is present .", "finding 1 is present ."] * 20}
    (tmp_path / "predictions").mkdir()
    for slug, p in preds.items():
        pd.DataFrame({"study_id": range(40), "reference": refs, "prediction": p}).to_csv(
            tmp_path / "predictions" / f"{slug}.csv", index=False)
    results = pd.DataFrame({"system": list(preds), "name": [SYSTEMS[s].name for s in preds],
                            "ce_f1": [0.25, 0.9, 0.4]})
    div = report_diversity(tmp_path, results)
    assert div["distinct reports"].tolist() == [1, 4, 2]
    assert div.loc["R2Gen", "most frequent share"] == 0.5
    names = results["name"].tolist()
    p = pd.DataFrame(1.0, index=names, columns=names)
    p.loc[names[1], names[0]] = p.loc[names[0], names[1]] = 0.001      # nearest neighbour beats the floor
    text = plain_summary(results, p, div)
    assert "Best CE-F1: **Nearest neighbour" in text
    assert "1 of 2 systems beat the most common training report" in text
    assert "Not distinguishable from it, or below it: R2Gen" in text
    assert "R2Gen (2)" in text and "Nearest neighbour (stage-2 embedding) (4)" in text   # <= 10 distinct
    refs = [["no acute cardiopulmonary process .", "small left pleural effusion .", "mild cardiomegaly .",
             "there is a small left pleural effusion ."][i % 4] for i in range(40)]
    for slug, reports in preds.items():    # four reference reports with three finding sets
        pd.DataFrame({"study_id": range(40), "reference": refs, "prediction": reports}).to_csv(
            tmp_path / "predictions" / f"{slug}.csv", index=False)
    sets = report_diversity(tmp_path, results, finding_sets=True)
    assert sets.index[0] == "References" and sets.loc["References", "distinct reports"] == 4
    assert sets.loc["References", "distinct finding sets"] == 3
    assert sets.loc["Most common report", "distinct finding sets"] == 1
    assert "The 40 references state 3 distinct sets of findings (8% of the studies)" in plain_summary(results, p, sets)
    # the notebooks' config: the smoke list and budget, and a comma-separated list otherwise
    smoke = notebook_config("x", smoke=True)
    assert smoke.systems[0] == "mambaxray-vl" and smoke.test_studies == 16
    assert notebook_config("x", systems="r2gen, most-common").systems == ["r2gen", "most-common"]
    assert notebook_config("x").systems is None and notebook_config("x", epochs=2).epochs == 2


def test_the_earlier_stage_wave_trains_each_shared_run_once():
    """MambaXray-VL's rows, nearest neighbour, the LM swap and R2GenGPT-style share stage 1, stage 2 and report
    LMs: the wave before the rows has one call per run, however many rows need it."""
    from cxpmrg_lib.bench import DEFAULT_SYSTEMS, notebook_config
    from cxpmrg_lib.bench.run import _earlier_runs

    systems = DEFAULT_SYSTEMS + ["lm-llama"]                          # the Llama swap runs on request
    calls, labels = _earlier_runs(notebook_config("/nowhere/phantom"), systems)
    runs = sorted((c.func.__name__, getattr(c.args[0], "init", ""), getattr(c.args[0], "arch", ""),
                   str(c.args[0].epochs)) for c in calls)
    assert runs == [("pretrain_autoregressive", "", "", "None"), ("pretrain_contrastive", "random", "", "None"),
                    ("pretrain_contrastive", "stage1", "", "None"), ("pretrain_report_lm", "", "gpt2", "None"),
                    ("pretrain_report_lm", "", "llama", "None")]     # the LM swap's Llama is MambaXray-VL's LM
    assert len(labels) == len(calls)
    old, _ = _earlier_runs(notebook_config("/nowhere/phantom", lm_epochs=2.0), systems)
    assert len(old) == len(calls) + 1                                 # the old setting: a 2-epoch Llama of its own


@pytest.mark.slow
def test_the_frozen_lm_baseline_trains_its_pretrained_backbone_and_keeps_its_best_weights(phantom, tmp_path):
    """R2GenGPT-style: the conv-token ViT (wrapped for ReportModel) takes the backbone step, trains, and its best
    checkpoint loads back by name (a backbone held under two names once broke that load)."""
    cfg = BenchConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), device="cpu", max_steps=2,
                      batch_size=4, val_studies=4, test_studies=4, earlier_epochs=0.1, n_boot=20, speed_studies=2,
                      systems=["most-common", "r2gengpt"], num_beams=2, jobs=1, backbone_steps=2)
    row = read_results(run_bench(cfg)).set_index("system").loc["r2gengpt"]
    assert "conv-token ViT: backbone first trained on the training findings (2 steps)" in row["note"]
    assert (Path(row["run_dir"]) / "best" / "model.safetensors").exists() and row["pretrain_min"] > 0


@pytest.mark.slow
def test_the_mechanism_systems_train_on_their_targets_and_write_rows(phantom, tmp_path):
    """PromptMRG-, TIMER-, M2KT-, XProNet-, WCL- and R2GenCSR-style through the benchmark: each row trained (its
    parts of the loss logged), its test reports written, its note saying what it added."""
    from cxpmrg_lib.runs import read_metrics

    mechanisms = ["promptmrg", "timer", "m2kt", "xpronet", "wcl", "r2gencsr"]
    cfg = BenchConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), device="cpu", max_steps=2,
                      batch_size=8, val_studies=4, test_studies=4, earlier_epochs=0.1, n_boot=20, speed_studies=2,
                      systems=["most-common"] + mechanisms, num_beams=2, jobs=1, backbone_steps=2)
    table = read_results(run_bench(cfg)).set_index("system")
    assert set(mechanisms) <= set(table.index)
    logged = {"promptmrg": "label_loss", "m2kt": "label_loss", "xpronet": "label_loss", "timer": "unlikelihood",
              "wcl": "contrastive"}
    for slug, part in logged.items():
        row = table.loc[slug]
        assert row["note"].startswith("Transformer + ") and "backbone first trained" in row["note"]
        records = [r for r in read_metrics(row["run_dir"]) if "loss" in r]
        assert records and all(part in r and "report_loss" in r for r in records), (slug, records[:1])
    assert json.loads((Path(table.loc["wcl", "run_dir"]) / "report_clusters.json").read_text())["clusters"] == 8
    assert json.loads((Path(table.loc["timer", "run_dir"]) / "penalised_tokens.json").read_text())["tokens"]
    csr = table.loc["r2gencsr"]
    assert "residuals against the 4 most similar normal and abnormal training studies" in csr["note"]
    assert csr["total_m"] > csr["trainable_m"] > 0 and csr["pretrain_min"] > 0     # the frozen LM, trained first
    for slug in mechanisms:
        preds = pd.read_csv(Path(run_bench(cfg)) / "predictions" / f"{slug}.csv")
        assert len(preds) == table.loc[slug, "n_test"] and preds["prediction"].map(lambda p: isinstance(p, str)).all()


def test_two_benchmarks_in_one_queue_write_what_each_writes_alone(phantom, tmp_path):
    """run_benches (04_benchmark: the main phantom and the iu-phantom in one queue of workers): each benchmark's
    rows land in its own results.csv, scored against its own reference, as run_bench on it alone writes them."""
    from dataclasses import replace

    from cxpmrg_lib.bench import run_benches

    other = write_phantom(tmp_path / "other", studies=40, size=64, seed=8, workers=1)
    a = BenchConfig(dataset_root=str(phantom), run_root=str(tmp_path / "runs"), systems=["most-common"],
                    test_studies=6, n_boot=20, speed_studies=2, jobs=2)
    b = replace(a, dataset_root=str(other), test_studies=5)
    out_a, out_b = run_benches([a, b])
    assert out_a != out_b and out_a.parent.parent.name == "phantom" and out_b.parent.parent.name == "other"
    table_a, table_b = read_results(out_a), read_results(out_b)
    assert list(table_a["system"]) == list(table_b["system"]) == ["most-common"]
    ids_a, ids_b = (set(pd.read_csv(o / "predictions" / "most-common.csv")["study_id"]) for o in (out_a, out_b))
    assert len(ids_a) == table_a["n_test"].iloc[0] and len(ids_b) == table_b["n_test"].iloc[0] <= 5
    out_alone = run_bench(replace(b, run_root=str(tmp_path / "alone"), jobs=1))
    alone = read_results(out_alone)
    assert set(pd.read_csv(out_alone / "predictions" / "most-common.csv")["study_id"]) == ids_b
    for column in ("bleu4", "ce_f1", "ce_f1_lo", "ce_f1_hi"):
        assert alone[column].iloc[0] == pytest.approx(table_b[column].iloc[0])
    mtime = (out_b / "results.csv").stat().st_mtime_ns           # done: asked again, nothing is redone
    assert run_benches([b]) == [out_b] and (out_b / "results.csv").stat().st_mtime_ns == mtime


def test_a_second_dataset_starts_from_the_main_datasets_pretraining():
    """for_dataset (04_benchmark's iu-phantom): with pretrain_on="main" MambaXray-VL's stages 1-2 and the stage-2
    encoder of nearest neighbour are the main dataset's runs; its report LM trains on the new dataset. "own" is
    the old setting, and the choice is part of the protocol."""
    from cxpmrg_lib.bench import for_dataset, notebook_config
    from cxpmrg_lib.bench.run import _earlier_runs

    main = notebook_config("/nowhere/phantom", dataset_kind="chexpert_plus")
    iu = for_dataset(main, "/nowhere/iu", "r2gen", "mambaxray-vl,nearest-neighbour,most-common")
    calls, _ = _earlier_runs(iu, iu.systems)
    where = sorted((c.func.__name__, c.args[0].dataset_root, c.args[0].dataset_kind) for c in calls)
    assert where == [("pretrain_contrastive", "/nowhere/phantom", "chexpert_plus"),
                     ("pretrain_report_lm", "/nowhere/iu", "r2gen")]
    assert iu.protocol()["pretraining"]["dataset_kind"] == "chexpert_plus"
    # one trained system (its report LM, then its stage 3: a chain) runs in one process with every core;
    # a second trained system gets the main benchmark's workers
    assert iu.jobs == 1 and main.jobs != 1
    with_r2gen = for_dataset(main, "/nowhere/iu", "r2gen", "mambaxray-vl,nearest-neighbour,most-common,r2gen")
    assert with_r2gen.jobs == main.jobs and with_r2gen.protocol() == for_dataset(
        main, "/nowhere/iu", "r2gen", "mambaxray-vl,nearest-neighbour,most-common,r2gen", jobs=1).protocol()
    own = for_dataset(main, "/nowhere/iu", "r2gen", "mambaxray-vl", pretrain_on="own")
    calls, _ = _earlier_runs(own, own.systems)
    assert {c.args[0].dataset_root for c in calls} == {"/nowhere/iu"} and own.jobs == 1
    assert "pretraining" not in own.protocol() and "pretraining" not in main.protocol()
    with pytest.raises(ValueError, match="pretrain_on"):
        for_dataset(main, "/nowhere/iu", "r2gen", pretrain_on="elsewhere")


def test_checkpoint_validations_decode_greedy_without_the_penalty_the_choice_sets(phantom):
    """Validations during training: greedy, no-repeat kept; no repetition penalty when the test decoding is
    chosen afterwards (the penalty is part of the choice), the fixed setting's penalty under "fixed". Part of
    the stage-3 hash and of the benchmark's protocol, so that a run selected the other way is not reused."""
    from cxpmrg_lib.bench import BenchConfig
    from cxpmrg_lib.stages.decoding import checkpoint_decoding

    fixed = {"num_beams": 3, "repetition_penalty": 2.0, "no_repeat_ngram_size": 3}
    assert checkpoint_decoding(fixed) == {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3}
    assert checkpoint_decoding(fixed, "fixed") == {**fixed, "num_beams": 1}
    with pytest.raises(ValueError, match="choice must be one of"):
        checkpoint_decoding(fixed, "best")
    chosen = BenchConfig(dataset_root=str(phantom)).protocol()
    assert chosen["decoding_choice"]["validation"]["repetition_penalty"] == 1.0
    assert "decoding_choice" not in BenchConfig(dataset_root=str(phantom), decoding_choice="fixed").protocol()


def test_the_decoding_choice_is_part_of_the_protocol():
    from cxpmrg_lib.bench import notebook_config

    chosen = notebook_config("/nowhere/phantom", dataset_kind="chexpert_plus")
    fixed = notebook_config("/nowhere/phantom", dataset_kind="chexpert_plus", decoding_choice="fixed")
    assert chosen.decoding_choice == "validation" and chosen.protocol()["decoding_choice"]["select"] == "bleu4 + ce_f1"
    assert "decoding_choice" not in fixed.protocol()            # the old protocol keeps its hash
    with pytest.raises(ValueError, match="decoding_choice"):
        notebook_config("x", decoding_choice="sampled")


def test_upstream_runs_find_an_encoder_pretrained_on_another_dataset(tmp_path):
    """A stage-3 run on the iu-phantom whose encoder is the main phantom's stage 2: its pre-training minutes
    (bench cost table) come from that run, under the other dataset's folder."""
    import yaml

    from cxpmrg_lib.runs import upstream_runs

    def run(path, resolved):
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(yaml.safe_dump({"config": {}, "resolved": resolved}))
        return path

    stage2 = run(tmp_path / "phantom_n1500" / "tiny" / "contrastive" / "aaa", {"stage": "contrastive"})
    lm = run(tmp_path / "iu" / "tiny" / "report_lm" / "bbb", {"stage": "report_lm"})
    stage3 = run(tmp_path / "iu" / "tiny" / "finetune" / "ccc",
                 {"stage": "finetune", "init": "stage2", "encoder_run": "aaa", "lm": str(lm / "lm"),
                  "pretraining": {"stage": "pretraining", "dataset": "/data/phantom_n1500"}})
    assert set(upstream_runs(stage3)) == {stage2, lm}


def test_the_queue_starts_one_row_of_each_shared_backbone_before_the_rows_that_load_it():
    """Rows whose CNN is one shared backbone step (the Transformer's, R2Gen's, the mechanism systems') do not
    start side by side: the second would wait on the step's lock while the first trains it."""
    from cxpmrg_lib.bench.run import row_order
    from cxpmrg_lib.bench.systems import DEFAULT_SYSTEMS

    rows = [(0, s) for s in DEFAULT_SYSTEMS] + [(1, "most-common"), (1, "r2gen"), (1, "mambaxray-vl")]
    order = row_order(rows)
    assert sorted(order) == sorted(rows)
    assert order[:2] == [(0, "mambaxray-vl"), (1, "mambaxray-vl")]          # each benchmark's reference first
    trained = [r for r in order if SYSTEMS[r[1]].order == 1]
    cnn = [n for n, (i, s) in enumerate(trained) if i == 0 and SYSTEMS[s].backbone_group == "cnn"]
    own = [n for n, (i, s) in enumerate(trained) if SYSTEMS[s].backbone_group != "cnn"]
    assert trained[cnn[0]] == (0, "transformer") and max(own) < cnn[1]     # one CNN row, then the other groups
    assert trained[cnn[1]:] == [(0, "r2gen"), (0, "r2gencmn"), (0, "promptmrg"), (0, "timer")]
    assert (1, "r2gen") in trained and trained.index((1, "r2gen")) < cnn[1]   # another dataset: its own backbone
    assert order[-3:] == [(0, "most-common"), (0, "nearest-neighbour"), (1, "most-common")]


def test_a_row_hash_of_decimal_digits_is_read_as_text(tmp_path):
    """A row hash is 12 hex digits; one made only of decimal digits was read back as a number, never matched
    the protocol's hash again, and its row was redone at every run."""
    pd.DataFrame({"system": ["most-common"], "name": ["Most common report"], "protocol": ["116482664981"],
                  "ce_f1": [0.2]}).to_csv(tmp_path / "results.csv", index=False)
    table = read_results(tmp_path)
    assert table["protocol"].iloc[0] == "116482664981" and isinstance(table["protocol"].iloc[0], str)
