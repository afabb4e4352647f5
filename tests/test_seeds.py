"""Training-seed replicates: the two-level bootstrap, Holm's correction, the seeds' folders and tables, and the
claims stated against the training noise."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib.bench import SYSTEMS, BenchConfig, bench_dir
from cxpmrg_lib.metrics import study_stats
from cxpmrg_lib.metrics.replicates import compare_replicates, seed_replicates
from cxpmrg_lib.metrics.stats import holm

REPORTS = ["no acute cardiopulmonary process .", "small left pleural effusion .", "mild cardiomegaly .",
           "there is a small left pleural effusion and mild cardiomegaly ."]
REFS = [REPORTS[i % 4] for i in range(60)]


def _stats(predictions, metrics=("ce_f1", "bleu4")):
    return study_stats(REFS, predictions, meteor=False, metrics=list(metrics))


def _with_errors(wrong: set[int]) -> list[str]:
    """The references, except the studies in `wrong`, which get the normal report (or a finding if normal)."""
    return [(REPORTS[1] if r == REPORTS[0] else REPORTS[0]) if i in wrong else r for i, r in enumerate(REFS)]


def test_holm_matches_the_step_down_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 of m = 4: x4, x3, x2, x1, then running maximum
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm([0.2, np.nan])[1]) and holm([0.2, np.nan])[0] == pytest.approx(0.2)  # NaN not counted
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]) and holm([]).size == 0


def test_one_seed_is_the_studies_bootstrap_and_equal_seeds_add_no_spread():
    st = _stats(_with_errors({1, 5, 9, 13}))
    one = seed_replicates([st], "ce_f1", n_boot=300, seed=3)
    assert np.array_equal(one, st.bootstrap(300, seed=3)["ce_f1"])
    # three identical seeds: no training noise, the same replicates as one
    assert np.allclose(seed_replicates([st, st, st], "ce_f1", n_boot=300, seed=3), one)


def test_the_seed_level_carries_the_training_spread():
    """Replicates' variance = the studies' part + s^2 / S (the small-sample scaling makes the seed part
    unbiased): three seeds far apart widen the interval well past the studies-only one."""
    seeds = [_stats(_with_errors(set(range(k, 60, step)))) for k, step in ((0, 30), (1, 6), (2, 3))]
    values = [s.values["ce_f1"] for s in seeds]
    reps = seed_replicates(seeds, "ce_f1", n_boot=4000, seed=0)
    studies = np.stack([s.bootstrap(4000, seed=0)["ce_f1"] for s in seeds]).mean(axis=0)
    expected = studies.var() + np.var(values, ddof=1) / 3
    assert reps.mean() == pytest.approx(np.mean(values), abs=0.02)
    assert reps.var() == pytest.approx(expected, rel=0.2)
    assert reps.var() > 2 * studies.var()


def test_a_gap_in_every_seed_is_significant_and_a_tie_is_not():
    good = [_stats(_with_errors({k, k + 7})) for k in range(3)]
    bad = [_stats(_with_errors(set(range(k, 60, 2)))) for k in range(3)]
    t = compare_replicates(good, bad, "ce_f1", n_boot=500)
    assert t["seeds"] == 3 and t["a_above"] == 3 and t["delta"] > 0.2 and t["p_value"] < 0.01
    assert t["ci_delta"][0] > 0
    tie = compare_replicates(good, good[::-1], "ce_f1", n_boot=500)
    assert tie["delta"] == pytest.approx(0) and tie["p_value"] > 0.5 and tie["a_above"] + tie["b_above"] <= 2
    with pytest.raises(ValueError, match="as many seeds"):
        compare_replicates(good, bad[:2], "ce_f1")


def _fake_bench(run_root, seeds=3, seed_systems=None) -> BenchConfig:
    """A benchmark's files for `seeds` training seeds, as run_bench writes them, without training:
    MambaXray-VL near the references, R2Gen as good (errors elsewhere), the ablation far below, the floor."""
    config = BenchConfig(dataset_root=str(run_root / "phantom"), dataset_kind="r2gen", run_root=str(run_root), seeds=seeds,
                         n_boot=400, systems=["mambaxray-vl", "r2gen", "mambaxray-vl-no-stage1", "most-common"],
                         seed_systems=seed_systems)
    (run_root / "phantom").mkdir(parents=True, exist_ok=True)
    for one in config.seed_configs():
        k = one.seed
        preds = {"mambaxray-vl": _with_errors({k, k + 11, k + 23}),
                 "r2gen": _with_errors({k + 3, k + 17, k + 31}),
                 "mambaxray-vl-no-stage1": _with_errors(set(range(k, 60, 2))),
                 "most-common": [REPORTS[0]] * 60}
        preds = {slug: p for slug, p in preds.items() if slug in one.system_list()}
        out = bench_dir(one)
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        for slug, p in preds.items():
            pd.DataFrame({"study_id": range(60), "reference": REFS, "prediction": p}).to_csv(
                out / "predictions" / f"{slug}.csv", index=False)
        pd.DataFrame({"system": list(preds), "name": [SYSTEMS[s].name for s in preds],
                      "family": [SYSTEMS[s].family for s in preds], "protocol": "x", "n_test": 60,
                      "ce_f1": [_stats(p, ["ce_f1"]).values["ce_f1"] for p in preds.values()]}).to_csv(
            out / "results.csv", index=False)
    return config


def test_seed_k_lives_in_its_own_folder_and_seed_zero_where_it_always_did(tmp_path):
    config = BenchConfig(dataset_root=str(tmp_path), dataset_kind="r2gen", run_root=str(tmp_path / "runs"), seeds=3,
                         seed=0)
    dirs = [bench_dir(c) for c in config.seed_configs()]
    assert dirs[0].name == "bench" and [d.name for d in dirs[1:]] == ["seed_1", "seed_2"]
    assert dirs[1].parent == dirs[0]
    assert config.training_seeds() == [0, 1, 2] and all(c.seeds == 1 for c in config.seed_configs())
    # the generation speed is measured on the first seed's rows only, and that is no part of a row's protocol
    assert [c.speed_studies for c in config.seed_configs()] == [config.speed_studies, 0, 0]
    from types import SimpleNamespace

    from cxpmrg_lib.bench.run import _speed

    skipped = _speed(SimpleNamespace(model=object(), decoding=None), SYSTEMS["r2gen"], config.seed_configs()[1],
                     SimpleNamespace(test=list(range(10))))
    assert np.isnan(skipped["reports_per_s"]) and np.isnan(skipped["peak_mib"])
    # the number of seeds is not part of a row's protocol: seed 0's rows are those of a one-seed benchmark
    assert config.seed_configs()[0].protocol() == replace(config, seeds=1).protocol()
    assert config.seed_configs()[1].protocol() != config.seed_configs()[0].protocol()
    assert config.seed_configs()[1].protocol() == replace(config, seed=1, seeds=1).protocol()
    with pytest.raises(ValueError, match="seeds"):
        BenchConfig(dataset_root=str(tmp_path), seeds=0)


def test_seed_tables_and_claims_say_what_the_seeds_support(tmp_path):
    from cxpmrg_lib.bench.seeds import (claims, pair_table, pvalue_matrix, score_seeds, seed_cells, seed_long,
                                        seed_results, seed_spread_summary, seed_table)

    config = _fake_bench(tmp_path / "runs")
    results = seed_results(config)
    assert sorted(results["seed"].unique()) == [0, 1, 2] and len(results) == 12
    assert results[results["system"] == "most-common"]["distinct"].eq(1).all()
    scores = score_seeds(config, results)
    table = seed_table(scores, results)
    full = table.loc["MambaXray-VL"]
    assert full["seeds"] == 3 and len(full["ce_f1_seeds"]) == 3
    assert full["ce_f1"] == pytest.approx(np.mean(full["ce_f1_seeds"]))
    assert full["ce_f1_sd"] == pytest.approx(np.std(full["ce_f1_seeds"], ddof=1))
    assert full["ce_f1_lo"] < full["ce_f1"] < full["ce_f1_hi"]
    assert table.loc["Most common report", "ce_f1_sd"] == 0           # a floor gives the same report every seed
    pairs = pair_table(scores)
    assert len(pairs) == 6 and (pairs["p_holm"] >= pairs["p"]).all()
    text = claims(scores, table, pairs)
    assert "MambaXray-VL > MambaXray-VL w/o stage 1: **holds**" in text and "above in 3 of 3 seeds" in text
    assert "R2Gen" in text.split("not separated from it within the noise:")[1].split("\n")[0] or \
        "MambaXray-VL" in text.split("not separated from it within the noise:")[1].split("\n")[0]
    assert "cannot be told apart" in text
    matrix = pvalue_matrix(pairs)
    assert matrix.shape == (4, 4) and np.isnan(matrix.iloc[0, 0])
    cells = seed_cells(table)
    assert "±" in cells.loc["MambaXray-VL", "CE-F1"] and "seeds" in cells.loc["MambaXray-VL", "CE-F1"]
    long = seed_long(table)
    assert set(long["metric"]) == {"ce_f1", "bleu4", "distinct"} and len(long) == 4 * 3 * 3
    spread = seed_spread_summary(table)
    assert spread["rows"] == 3 and spread["max_sd"] >= spread["median_sd"] > 0
    # saved beside the first seed's results, read back by the reproducibility chapter
    from cxpmrg_lib.bench.seeds import read_seed_tables, save_seed_table

    save_seed_table(config, table)
    saved = read_seed_tables(config.run_root)
    assert list(saved) == ["phantom/tiny"]
    back = saved["phantom/tiny"]
    assert back.loc["MambaXray-VL", "ce_f1_seeds"] == pytest.approx(table.loc["MambaXray-VL", "ce_f1_seeds"])
    assert seed_spread_summary(back)["max_sd"] == pytest.approx(spread["max_sd"])
    from cxpmrg_lib.chapters.reproducibility import seed_yardstick

    yard = seed_yardstick(config.run_root).set_index("metric")
    assert yard.loc["ce_f1", "seeds"] == 3 and yard.loc["ce_f1", "largest seed sd"] == pytest.approx(spread["max_sd"])
    assert yard.loc["ce_f1", "row"] == "MambaXray-VL w/o stage 1"        # the ablation's seeds are far apart
    # the paper's rows beside ours: the seed table's labelled columns still find the paper's numbers
    from cxpmrg_lib.bench import beside_paper

    shown = beside_paper(cells, results)
    assert "<i>" in shown.loc["R2Gen (paper, CheXpert Plus)", "CE-F1"]


def test_the_run_table_names_the_system_of_a_seeds_row():
    from cxpmrg_lib.chapters.reproducibility import _bench_system

    assert _bench_system(("phantom", "tiny", "bench", "r2gen", "abc")) == "r2gen"
    assert _bench_system(("phantom", "tiny", "bench", "seed_2", "r2gen", "abc")) == "r2gen"
    assert _bench_system(("phantom", "tiny", "finetune", "abc")) == ""


def test_one_seed_says_which_claims_it_cannot_support(tmp_path):
    from cxpmrg_lib.bench.seeds import claims, pair_table, score_seeds, seed_results, seed_table

    config = _fake_bench(tmp_path / "runs", seeds=1)
    results = seed_results(config)
    scores = score_seeds(config, results)
    table = seed_table(scores, results)
    text = claims(scores, table, pair_table(scores))
    assert "**One training seed.**" in text
    assert "**holds**" not in text and "not supported within the training noise" in text
    assert np.isnan(table.loc["MambaXray-VL", "ce_f1_sd"])


def test_a_missing_seed_is_left_out_and_named(tmp_path):
    from cxpmrg_lib.bench.seeds import seed_note, seed_results

    config = _fake_bench(tmp_path / "runs", seeds=2)
    results = seed_results(replace(config, seeds=3))            # seed 2 never ran
    assert sorted(results["seed"].unique()) == [0, 1]
    assert "fewer than the 3 seeds" in seed_note(replace(config, seeds=3), results)
    with pytest.raises(FileNotFoundError, match="run the benchmark first"):
        seed_results(replace(config, run_root=str(tmp_path / "nothing")))


def test_rows_outside_seed_systems_train_at_the_first_seed_only_and_the_claims_say_so(tmp_path):
    from cxpmrg_lib.bench.seeds import claims, pair_table, score_seeds, seed_note, seed_results, seed_table

    keep = ["mambaxray-vl", "mambaxray-vl-no-stage1", "most-common"]
    config = _fake_bench(tmp_path / "runs", seeds=3, seed_systems=keep)
    assert [c.systems for c in config.seed_configs()][1:] == [keep, keep]   # in the benchmark's order
    assert config.seed_configs()[0].system_list() == config.system_list()
    assert config.single_seed() == ["r2gen"] and replace(config, seeds=1).single_seed() == []
    # which rows replicate is no part of any row's protocol: seed 0's rows are those of every other setting
    assert config.seed_configs()[0].protocol() == replace(config, seed_systems=None).seed_configs()[0].protocol()
    results = seed_results(config)
    assert results.groupby("system")["seed"].nunique().to_dict() == {
        "mambaxray-vl": 3, "mambaxray-vl-no-stage1": 3, "most-common": 3, "r2gen": 1}
    scores = score_seeds(config, results)
    table = seed_table(scores, results)
    assert table.loc["R2Gen", "seeds"] == 1 and np.isnan(table.loc["R2Gen", "ce_f1_sd"])
    assert table.loc["MambaXray-VL", "seeds"] == 3
    pairs = pair_table(scores)
    assert set(pairs[(pairs["slug_a"] == "r2gen") | (pairs["slug_b"] == "r2gen")]["seeds"]) == {1}
    text = claims(scores, table, pairs)
    assert "MambaXray-VL > MambaXray-VL w/o stage 1: **holds**" in text    # the replicated rows keep their tests
    r2gen_pair = [line for line in text.splitlines() if "R2Gen and" in line or "and R2Gen" in line]
    assert all("above in 1 of 1 seeds" in line or "1 of 1" in line for line in r2gen_pair)
    note = seed_note(config, results)
    assert "first seed only" in note and "R2Gen" in note and "fewer than" not in note
    with pytest.raises(ValueError, match="reference"):
        replace(config, seed_systems=["r2gen"])
    with pytest.raises(ValueError, match="unknown"):
        replace(config, seed_systems=["mambaxray-vl", "nope"])


def test_the_note_says_when_a_one_seed_baseline_outranks_a_replicated_one(tmp_path):
    from cxpmrg_lib.bench.seeds import seed_note

    config = BenchConfig(dataset_root=str(tmp_path), dataset_kind="r2gen", seeds=3,
                         systems=["mambaxray-vl", "r2gen", "transformer", "timer"],
                         seed_systems=["mambaxray-vl", "r2gen"])
    rows = [("mambaxray-vl", s, 0.5) for s in (0, 1, 2)] + [("r2gen", s, 0.6) for s in (0, 1, 2)]
    results = pd.DataFrame(rows + [("transformer", 0, 0.4), ("timer", 0, 0.7)], columns=["system", "seed", "ce_f1"])
    results["name"] = [SYSTEMS[s].name for s in results["system"]]
    note = seed_note(config, results)
    assert "Transformer" in note and "first seed only" in note
    assert "TIMER-style" in note.split("scored above")[0] and "0.700 against 0.600" in note
    below = results[results["system"] != "timer"]
    assert "every one of them scored below" in seed_note(replace(config, systems=["mambaxray-vl", "r2gen",
                                                                                   "transformer"]), below)
