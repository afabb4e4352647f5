"""The rule labeller: API, scope rules, and its agreement with three references
(phantom labels, the hand-labelled set, IU X-Ray MeSH indexing)."""
from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from cxpmrg_lib.labels import labeler
from cxpmrg_lib.labels.labeler import CHEXPERT_LABELS, label_report, label_reports
from cxpmrg_lib.labels.mesh import MESH_TO_CHEXPERT, mesh_agreement, mesh_to_labels
from cxpmrg_lib.data.observations import CHEXPERT_LABELS as OBS_LABELS

NAN = math.nan


def _lab(text, **kw):
    return label_report(text, **kw)


def _same(a, b):
    return (a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_api_shape_order_and_blank_rows():
    assert CHEXPERT_LABELS is OBS_LABELS
    df = label_reports(["Mild cardiomegaly.", None, "", float("nan"), "   ", "No pneumothorax."])
    assert list(df.columns) == OBS_LABELS and len(df) == 6 and list(df.index) == list(range(6))
    assert df.loc[0, "Cardiomegaly"] == 1.0 and math.isnan(df.loc[0, "No Finding"])
    for i in (1, 2, 3, 4):                      # no report: nothing known, No Finding included
        assert df.loc[i].isna().all()
    assert df.loc[5, "Pneumothorax"] == 0.0 and df.loc[5, "No Finding"] == 1.0
    assert set(np.unique(df.to_numpy()[~np.isnan(df.to_numpy())])) <= {1.0, 0.0, -1.0}
    with pytest.raises(TypeError):
        label_reports("one string")
    with pytest.raises(ValueError, match="unknown labeller backend"):
        label_reports(["x"], backend="nope")


@pytest.mark.parametrize("text, expected", [
    ("No pneumothorax or effusion.", {"Pneumothorax": 0.0, "Pleural Effusion": 0.0, "No Finding": 1.0}),
    ("no pneumothorax. small effusion", {"Pneumothorax": 0.0, "Pleural Effusion": 1.0, "No Finding": NAN}),
    ("No pneumothorax, small left effusion.", {"Pneumothorax": 0.0, "Pleural Effusion": 1.0}),
    ("No focal consolidation, large pleural effusion, or pneumothorax is identified.",
     {"Consolidation": 0.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0}),
    ("No new consolidation.", {"Consolidation": 0.0}),
    ("HEART SIZE IS NORMAL!", {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": NAN}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}),
    ("The lungs are clear.", {"Lung Opacity": 0.0, "Consolidation": NAN, "Edema": NAN, "No Finding": 1.0}),
    ("The ET tube has been removed.", {"Support Devices": 0.0}),
    ("Interval removal of the NG tube.", {"Support Devices": 0.0}),
    ("ETT tip 3 cm above the carina.", {"Support Devices": 1.0, "No Finding": 1.0}),
    ("Small pericardial effusion.", {"Pleural Effusion": NAN}),
    ("Calcified granuloma in the right upper lobe.", {"Lung Lesion": NAN, "No Finding": 1.0}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1.0, "No Finding": NAN}),
    ("Resolved effusion.", {"Pleural Effusion": 0.0}),
    ("Stable mild cardiomegaly.", {"Cardiomegaly": 1.0}),
    ("No acute cardiopulmonary process.", {"No Finding": 1.0, "Pneumonia": NAN}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"Lung Opacity": 0.0, "Pneumonia": 0.0}),
    ("Atelectasis versus pneumonia.", {"Atelectasis": -1.0, "Pneumonia": -1.0}),
    ("Opacity which may represent atelectasis.", {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
    ("No change in the left pleural effusion.", {"Pleural Effusion": 1.0}),
    ("Pneumothorax, effusion and consolidation are not seen.",
     {"Pneumothorax": 0.0, "Pleural Effusion": 0.0, "Consolidation": 0.0}),
    ("Possible small effusion, no pneumothorax.", {"Pleural Effusion": -1.0, "Pneumothorax": 0.0}),
    ("? pneumonia", {"Pneumonia": -1.0}),
    ("Borderline heart size.", {"Cardiomegaly": -1.0}),
    ("Blunting of the left costophrenic angle.", {"Pleural Effusion": -1.0}),
    ("CHF.", {"Edema": 1.0}),
    ("Left PICC terminates in the SVC. Pacer leads intact.", {"Support Devices": 1.0}),
    ("Measures 3.5 cm. No effusion.", {"Pleural Effusion": 0.0}),
])
def test_rules_on_short_texts(text, expected):
    got = _lab(text)
    for k, v in expected.items():
        assert _same(got[k], v), f"{text!r}: {k} = {got[k]}, expected {v}"


def test_aggregation_positive_beats_uncertain_beats_negative():
    assert _lab("No effusion. Possible small effusion. Small effusion.")["Pleural Effusion"] == 1.0
    assert _lab("No effusion. Possible small effusion.")["Pleural Effusion"] == -1.0
    assert _lab("No effusion. No pleural effusion.")["Pleural Effusion"] == 0.0
    # Support Devices alone does not remove No Finding; an uncertain pathology does
    assert _lab("Right chest tube. Lungs clear.")["No Finding"] == 1.0
    assert math.isnan(_lab("Possible nodule.")["No Finding"])


def test_clear_lungs_option_follows_chexbert_practice():
    assert _lab("The lungs are clear.")["Lung Opacity"] == 0.0
    assert math.isnan(_lab("The lungs are clear.", clear_lungs_negate=False)["Lung Opacity"])
    df = label_reports(["The lungs are clear."], clear_lungs_negate=False)
    assert math.isnan(df.loc[0, "Lung Opacity"])


def _hand_set(name="hand_labelled_reports.jsonl"):
    path = resources.files("cxpmrg_lib") / "resources" / name
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    gold = np.full((len(rows), 14), np.nan)
    for i, r in enumerate(rows):
        for k, v in r["labels"].items():
            gold[i, OBS_LABELS.index(k)] = v
        # gold No Finding by the CheXpert rule from the gold pathology labels
        if not np.isin(gold[i, :12], [1.0, -1.0]).any():
            gold[i, 13] = 1.0
    return rows, gold


def test_hand_labelled_set_accuracy():
    rows, gold = _hand_set()
    assert len(rows) >= 150
    for j, k in enumerate(OBS_LABELS[:13]):           # every observation in all three forms
        assert {1.0, 0.0, -1.0} <= set(gold[:, j][~np.isnan(gold[:, j])]), k
    pred = label_reports([r["text"] for r in rows]).to_numpy()
    eq = (gold == pred) | (np.isnan(gold) & np.isnan(pred))
    acc = eq.mean()
    per_obs = {k: round(float(eq[:, j].mean()), 3) for j, k in enumerate(OBS_LABELS)}
    print(f"\nhand-labelled set: n={len(rows)} cell accuracy {acc:.4f}; per observation {per_obs}")
    assert acc >= 0.95
    assert min(per_obs.values()) >= 0.9


def test_blind_heldout_set_accuracy():
    """192 items written by someone who never saw the rules; the rules were not tuned on them.

    Measured when the set was added: cell accuracy 0.9948, 93.8% of items entirely right.
    Keep it held out: fix rules from other evidence, not from these items.
    """
    rows, gold = _hand_set("hand_labelled_heldout.jsonl")
    assert len(rows) >= 150
    for j, k in enumerate(OBS_LABELS[:13]):
        assert {1.0, 0.0, -1.0} <= set(gold[:, j][~np.isnan(gold[:, j])]), k
    pred = label_reports([r["text"] for r in rows]).to_numpy()
    eq = (gold == pred) | (np.isnan(gold) & np.isnan(pred))
    print(f"\nheld-out set: n={len(rows)} cell accuracy {eq.mean():.4f}; items entirely right {eq.all(1).mean():.3f}")
    assert eq.mean() >= 0.95
    assert eq.all(1).mean() >= 0.85


def test_trigger_shortcut_gives_identical_labels():
    rows, _ = _hand_set()
    texts = [r["text"] for r in rows] + ["Heart size normal. No consolidation.", "x" * 50]
    for t in texts:
        labeler.clear_cache()
        a = label_report(t)
        b = label_report(t, use_triggers=False)
        assert all(_same(a[k], b[k]) for k in OBS_LABELS), t


def _f1(g, p):
    tp, fp, fn = (g & p).sum(), (~g & p).sum(), (g & ~p).sum()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan


def test_phantom_reports_recover_their_labels(tmp_path):
    phantom = pytest.importorskip("cxpmrg_lib.data.phantom")
    root = phantom.write_phantom(tmp_path / "phantom", studies=300, size=64, seed=3, workers=1)
    csv = pd.read_csv(root / "df_chexpert_plus_240401.csv")
    for col, fname in (("section_findings", "findings_fixed.json"), ("section_impression", "impression_fixed.json")):
        truth = {}
        for line in (root / "chexbert_labels" / fname).read_text().splitlines():
            r = json.loads(line)
            truth[r["path_to_image"]] = r
        gold = np.array([[np.nan if truth[p][k] is None else truth[p][k] for k in OBS_LABELS]
                         for p in csv["path_to_image"]], dtype=float)
        # the phantom and the labeller share one convention: "the lungs are clear" -> Lung Opacity 0
        pred = label_reports(csv[col].tolist()).to_numpy()
        f1 = [_f1(gold[:, j] == 1.0, pred[:, j] == 1.0) for j in range(14)]
        macro = np.nanmean(f1)
        exact = ((gold == pred) | (np.isnan(gold) & np.isnan(pred))).mean()
        print(f"\nphantom {col}: macro F1 (1.0 = positive) {macro:.4f}; exact 4-valued agreement {exact:.4f}")
        assert macro >= 0.98
        assert exact >= 0.98


def test_mesh_mapping_examples():
    labs = mesh_to_labels(["Cardiomegaly/mild", "Pleural Effusion/left/small", "Opacity/lung/base/left"])
    assert labs["Cardiomegaly"] == 1.0 and labs["Pleural Effusion"] == 1.0 and labs["Lung Opacity"] == 1.0
    assert math.isnan(labs["No Finding"]) and math.isnan(labs["Pneumothorax"])
    assert mesh_to_labels(["normal"])["No Finding"] == 1.0
    assert mesh_to_labels(["Calcified Granuloma/lung/upper lobe/right"])["No Finding"] == 1.0
    assert math.isnan(mesh_to_labels(["No Indexing"])["No Finding"])
    assert mesh_to_labels(["Thickening/pleura/apex"])["Pleural Other"] == 1.0
    assert math.isnan(mesh_to_labels(["Thickening/pleura/apex"])["Lung Opacity"])
    assert math.isnan(mesh_to_labels(["Mediastinum/lymph nodes/enlarged"])["Enlarged Cardiomediastinum"])
    assert mesh_to_labels(["Mediastinum/prominent/mild"])["Enlarged Cardiomediastinum"] == 1.0
    assert mesh_to_labels(["Catheters, Indwelling/right"])["Support Devices"] == 1.0
    assert {lab for r in MESH_TO_CHEXPERT for lab in r.labels} == set(OBS_LABELS)


def test_iu_reports_agree_with_mesh_indexing():
    openi = pytest.importorskip("cxpmrg_lib.data.openi")
    try:
        df = openi.load_openi_reports()
    except openi.DataError as e:  # pragma: no cover - archive missing on this machine
        pytest.skip(str(e))
    strict = mesh_agreement(df)
    lenient = mesh_agreement(df, uncertain_as_positive=True)
    with pd.option_context("display.width", 160, "display.max_columns", 10):
        print(f"\nIU X-Ray vs MeSH ({strict.attrs['n_reports']} reports), labeller positive = 1.0:\n{strict.round(3)}")
        print(f"labeller positive = 1.0 or -1.0:\n{lenient.round(3)}")
    macro = strict.iloc[-1]
    assert strict.attrs["n_reports"] > 3500
    assert strict["included"].sum() >= 12                  # every observation but rare ones has >= 20 positives
    assert macro["f1"] >= 0.80
    assert strict.loc["Cardiomegaly", "f1"] >= 0.85 and strict.loc["Pleural Effusion", "f1"] >= 0.85


def test_chexbert_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CheXbert checkpoint not found"):
        label_reports(["No effusion."], backend="chexbert", checkpoint=tmp_path / "missing.pth", tokenizer=tmp_path)


def test_chexbert_head_layout_and_class_mapping(tmp_path):
    torch = pytest.importorskip("torch")
    from cxpmrg_lib.labels.chexbert import build_chexbert, classes_to_labels, load_chexbert, predict_classes
    torch.manual_seed(0)
    model = build_chexbert(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           vocab_size=40, max_position_embeddings=64)
    shapes = [tuple(h.weight.shape) for h in model.linear_heads]
    assert shapes == [(4, 32)] * 13 + [(2, 32)]
    # class index -> value: 0 blank, 1 positive, 2 negative, 3 uncertain; No Finding 0 blank, 1 positive
    df = classes_to_labels([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 1, 1], [3] * 13 + [0]])
    assert df.iloc[0, :4].tolist()[1:] == [1.0, 0.0, -1.0] and math.isnan(df.iloc[0, 0])
    assert df.loc[0, "No Finding"] == 1.0 and math.isnan(df.loc[1, "No Finding"])
    assert (df.iloc[1, :13] == -1.0).all()
    with pytest.raises(ValueError):
        classes_to_labels([[2] * 13 + [2]])                # No Finding has only two classes
    # a random tiny model end to end through a minimal tokenizer
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "effusion", "mild", "cardiomegaly", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model.eval()
    classes = predict_classes(model, tok, ["no effusion .", "", "mild cardiomegaly ."])
    assert classes.shape == (3, 14) and (classes[1] == 0).all()
    assert classes[:, :13].max() <= 3 and classes[:, 13].max() <= 1
    # a state dict saved as CheXbert does (DataParallel "module." prefix) loads only into the same layout
    ckpt = tmp_path / "bad.pth"
    torch.save({"model_state_dict": {"module.linear_heads.0.weight": torch.zeros(4, 768)}}, ckpt)
    with pytest.raises(ValueError, match="does not fit the CheXbert layout"):
        load_chexbert(ckpt)


def test_fill_labels_keeps_known_labels_and_fills_unknown():
    import pandas as pd
    from cxpmrg_lib.labels.labeler import fill_labels

    table = pd.DataFrame({"study_id": ["a", "b"], "report": ["Small left pleural effusion.", "No pneumothorax."]},
                         index=[10, 11])
    table["Pleural Effusion"] = [float("nan"), 0.0]
    table["Pneumothorax"] = [float("nan"), 1.0]  # a source label that disagrees with the text is kept
    out = fill_labels(table)
    assert list(out.index) == [10, 11]
    assert out.loc[10, "Pleural Effusion"] == 1.0 and out.loc[11, "Pleural Effusion"] == 0.0
    assert out.loc[11, "Pneumothorax"] == 1.0
    assert out.loc[10, "Cardiomegaly"] != out.loc[10, "Cardiomegaly"]  # NaN: not mentioned
    assert "Cardiomegaly" not in table.columns  # input untouched
