"""Training diagnostics: validation records read back from run folders, label rates, the decoding sweep,
and whether an encoder's features differ between studies."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cxpmrg_lib.chapters import diagnostics
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def _run(tmp_path, name, evals):
    run = tmp_path / name
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
        for step, ev in evals:
            f.write(json.dumps({"step": step, "eval": ev}) + "\n")
    return run


def _ev(ce, distinct, card):
    ev = {"bleu4": 0.1, "ce_f1": ce, "select": 0.1 + ce, "distinct": distinct}
    ev.update({f"pos:{c}": 0.0 for c in CHEXPERT_LABELS})
    ev.update({f"ref:{c}": 0.2 for c in CHEXPERT_LABELS})
    ev["pos:Cardiomegaly"] = card
    return ev


def test_curves_rates_and_collapse_table(tmp_path):
    a = _run(tmp_path, "a", [(10, _ev(0.2, 0.02, 0.0)), (20, _ev(0.35, 0.6, 0.15))])
    b = _run(tmp_path, "b", [(10, _ev(0.24, 0.01, 0.0))])
    curves = diagnostics.validation_curves({"A": a, "B": b, "floor": None, "gone": tmp_path / "nope"})
    assert list(curves["system"]) == ["A", "A", "B"] and list(curves["step"]) == [10, 20, 10]
    rates = diagnostics.label_rates(curves)
    card = rates[(rates["system"] == "A") & (rates["observation"] == "Cardiomegaly")].iloc[0]
    assert card["predicted"] == 0.15 and card["reference"] == 0.2 and card["step"] == 20
    table = diagnostics.collapse_table(curves)
    assert table.loc["A", "distinct first"] == 0.02 and table.loc["A", "distinct last"] == 0.6
    assert table.loc["A", "findings named"] == 1 and table.loc["B", "findings named"] == 0
    assert table.loc["A", "best CE-F1"] == 0.35


class _Echo(torch.nn.Module):
    """Writes a report that depends on the image only when decoding uses no repetition penalty."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, images, image_mask=None, num_beams=1, repetition_penalty=1.0, **_):
        if repetition_penalty > 1.0:
            return ["the lungs are clear ."] * len(images)
        return ["there is cardiomegaly ." if float(x.mean()) > 0 else "the lungs are clear ." for x in images]


class _Studies(torch.utils.data.Dataset):
    def __init__(self, n):
        self.images = [torch.full((1, 1, 4, 4), 1.0 if i % 2 else -1.0) for i in range(n)]
        self.reports = ["there is cardiomegaly ." if i % 2 else "the lungs are clear ." for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i][0:1], "image_mask": torch.ones(1, dtype=torch.bool),
                "report": self.reports[i], "labels": torch.zeros(14), "study_id": str(i)}


def test_decoding_sweep_scores_every_setting():
    sweep = diagnostics.decoding_sweep(_Echo(), _Studies(8), {"num_beams": (1,), "repetition_penalty": (1.0, 2.0),
                                                            "no_repeat_ngram_size": (0,)})
    assert len(sweep) == 2
    free, penalised = sweep.iloc[0], sweep.iloc[1]
    assert free["distinct"] == pytest.approx(2 / 8) and penalised["distinct"] == pytest.approx(1 / 8)
    assert free["ce_f1"] > penalised["ce_f1"]


def test_feature_spread_tells_constant_features_from_varied_ones():
    studies = _Studies(8)
    constant = diagnostics.feature_spread(lambda x, m: torch.ones(x.shape[0], 3, 5), studies)
    varied = diagnostics.feature_spread(lambda x, m: x.flatten(1)[:, None, :4].repeat(1, 3, 1) + 0.1, studies)
    assert constant["between_study_spread"] == pytest.approx(0.0, abs=1e-6)
    assert constant["mean_cosine_between_studies"] == pytest.approx(1.0)
    assert varied["between_study_spread"] > 1.0 and varied["mean_cosine_between_studies"] < 0.5


_DEFAULT = {"num_beams": 3, "repetition_penalty": 2.0, "no_repeat_ngram_size": 3}


def test_choose_decoding_picks_the_best_validation_setting_and_records_the_sweep():
    from cxpmrg_lib.stages.decoding import CHOICE_GRID, choose_decoding

    chosen, table = choose_decoding(_Echo(), _Studies(8), _DEFAULT)
    assert len(table) == 6 and int(table["chosen"].sum()) == 1
    assert chosen["repetition_penalty"] == 1.0              # the only penalty under which the reports follow the image
    assert chosen["num_beams"] == CHOICE_GRID["num_beams"][0]   # greedy and beam tie: the earlier row
    assert table.loc[table["chosen"], "select"].item() == table["select"].max()


class _Same(_Echo):
    def generate(self, images, image_mask=None, **_):
        return ["the lungs are clear ."] * len(images)


def test_choose_decoding_keeps_the_protocol_setting_on_a_tie():
    from cxpmrg_lib.stages.decoding import choose_decoding

    chosen, table = choose_decoding(_Same(), _Studies(8), _DEFAULT)
    assert chosen == _DEFAULT and table["select"].nunique() == 1


def test_decoding_for_fixed_is_the_default_and_validation_is_kept_in_the_run(tmp_path, monkeypatch):
    from cxpmrg_lib.stages import decoding

    assert decoding.decoding_for(_Echo(), _Studies(4), _DEFAULT, "fixed", tmp_path) == _DEFAULT
    assert not (tmp_path / "decoding.json").exists()
    chosen = decoding.decoding_for(_Echo(), _Studies(8), _DEFAULT, "validation", tmp_path)
    assert chosen["repetition_penalty"] == 1.0
    assert json.loads((tmp_path / "decoding.json").read_text())["chosen"] == chosen
    assert len(pd.read_csv(tmp_path / "decoding_choice.csv")) == 6

    def no_sweep(*a, **k):
        raise AssertionError("swept again")

    monkeypatch.setattr(decoding, "choose_decoding", no_sweep)
    assert decoding.decoding_for(_Echo(), _Studies(8), _DEFAULT, "validation", tmp_path) == chosen
    with pytest.raises(ValueError, match="decoding choice"):
        decoding.decoding_for(_Echo(), _Studies(8), _DEFAULT, "best", tmp_path)
    assert decoding.describe_decoding(chosen) == "greedy, rp 1, no-repeat 3"


class _Guided(_Echo):
    """Follows the image only under guidance (a frozen-LM head stuck on its prior without it)."""

    def generate(self, images, image_mask=None, num_beams=1, repetition_penalty=1.0, guidance=1.0, **_):
        if guidance <= 1.0:
            return ["the lungs are clear ."] * len(images)
        return super().generate(images, image_mask, num_beams, repetition_penalty)


def test_guidance_is_chosen_only_by_models_with_an_empty_slot_prior(tmp_path, monkeypatch):
    from cxpmrg_lib.stages import decoding

    settings = decoding.grid_settings(decoding.CHOICE_GRID, guided=True)
    guided = [s for s in settings if "guidance" in s]
    assert len(settings) == 6 + len(decoding.GUIDANCE_SCALES)
    assert [s["guidance"] for s in guided] == list(decoding.GUIDANCE_SCALES)
    assert all(s["num_beams"] == 1 and s["repetition_penalty"] == 1.0 and s["no_repeat_ngram_size"] == 3
               for s in guided)
    assert not decoding.supports_guidance(_Echo())
    # an encoder-decoder model: the six settings, no guidance column
    _, table = decoding.choose_decoding(_Echo(), _Studies(8), _DEFAULT)
    assert "guidance" not in table and len(table) == 6
    # a model with the prior: the guided settings join the choice; the first (smallest) scale wins the tie
    monkeypatch.setattr(decoding, "supports_guidance", lambda m: isinstance(m, _Guided))
    chosen = decoding.decoding_for(_Guided(), _Studies(8), _DEFAULT, "validation", tmp_path)
    assert chosen == {**_DEFAULT, "num_beams": 1, "repetition_penalty": 1.0,
                      "guidance": decoding.GUIDANCE_SCALES[0]}
    table = pd.read_csv(tmp_path / "decoding_choice.csv")
    assert len(table) == 9 and set(table["guidance"]) == {1.0, *decoding.GUIDANCE_SCALES}
    assert json.loads((tmp_path / "decoding.json").read_text())["grid"]["guidance"] == [1.0, *decoding.GUIDANCE_SCALES]
    assert decoding.describe_decoding(chosen) == "greedy, rp 1, no-repeat 3, guidance 1.5"
    # no guidance chosen: the key is left out (the decoding of a run made before guidance existed)
    monkeypatch.setattr(decoding, "supports_guidance", lambda m: True)
    chosen, _ = decoding.choose_decoding(_Echo(), _Studies(8), _DEFAULT)
    assert "guidance" not in chosen
