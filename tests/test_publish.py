"""Publish-safety: restricted datasets put only aggregates into the book unless the reader opts in."""
import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from cxpmrg_lib.chapters import publish
from cxpmrg_lib.data.phantom import DATASET_MARKER, write_iu_phantom, write_phantom
from cxpmrg_lib.data.openi import openi_available

ROOT = Path(__file__).resolve().parents[1]
SECRET = "zebracorn"     # a word in every report of the fake restricted tree, and nowhere else


def make_restricted_tree(root: Path) -> Path:
    """A tiny tree that looks like a real CheXpert Plus: a phantom without its phantom files,
    every findings section starting with a distinctive sentence."""
    write_phantom(root, studies=16, size=64, seed=0, workers=1)
    for name in ("phantom_truth.csv", "README.txt", DATASET_MARKER):
        os.remove(root / name)
    csv = root / "df_chexpert_plus_240401.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df["section_findings"] = [f"{SECRET.capitalize()} marker sentence {i} is seen. {t}"
                              for i, t in enumerate(df["section_findings"])]
    df.to_csv(csv, index=False)
    return root


def make_r2gen_tree(root: Path, ids: list[str], paths: list[list[str]]) -> Path:
    root.mkdir(parents=True)
    items = [{"id": i, "report": "The lungs are clear.", "image_path": p, "split": "train"} for i, p in zip(ids, paths)]
    (root / "annotation.json").write_text(json.dumps({"train": items, "val": [], "test": []}))
    return root


@pytest.fixture(scope="module")
def nb_work(tmp_path_factory):
    """Shared by both notebook runs: the phantoms that notebook 00 writes are made once."""
    return tmp_path_factory.mktemp("publish_nb")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("publish")
    return {"phantom": write_phantom(base / "phantom", studies=4, size=32, seed=0, workers=1),
            "restricted": make_restricted_tree(base / "chexpert_plus")}


def test_phantom_is_publishable_with_and_without_marker(trees, tmp_path):
    pol = publish.policy(trees["phantom"])
    assert (pol.dataset, pol.redistributable, pol.allowed) == ("phantom", True, True)
    marker = json.loads((trees["phantom"] / DATASET_MARKER).read_text())
    assert marker["dataset"] == "phantom" and marker["redistributable"] is True
    # a tree written before the marker existed is still recognised by its phantom files
    old = tmp_path / "old"
    write_phantom(old, studies=2, size=32, seed=1, workers=1)
    (old / DATASET_MARKER).unlink()
    pol = publish.policy(old)
    assert (pol.dataset, pol.allowed) == ("phantom", True)
    assert "phantom_truth.csv" in pol.reason


def test_fake_chexpert_plus_is_restricted(trees):
    pol = publish.policy(trees["restricted"])
    assert (pol.dataset, pol.redistributable, pol.allowed) == ("chexpert_plus", False, False)
    assert "Research Use Agreement" in pol.licence          # from data_manifests/chexpert_plus.yaml
    assert "Chambon" in pol.citation
    text = publish.notice(pol, "sample radiographs")
    assert "Not shown: sample radiographs" in text and "-p publish_restricted True" in text
    opted = publish.policy(trees["restricted"], allow_restricted=True)
    assert opted.allowed and not opted.redistributable and opted.restricted_but_shown
    assert publish.notice(opted) == ""


def test_r2gen_trees_follow_the_dataset_guess(tmp_path):
    mimic = make_r2gen_tree(tmp_path / "mimic", ["50414267", "53189527"],
                            [["p10/p10000032/s50414267/02aa804e.jpg"], ["p10/p10000032/s53189527/2a2277a9.jpg"]])
    iu = make_r2gen_tree(tmp_path / "iu", ["CXR2384_IM-0942", "CXR1_1_IM-0001"],
                         [["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                          ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]])
    pm, pi = publish.policy(mimic), publish.policy(iu)
    assert (pm.dataset, pm.allowed) == ("mimic_cxr", False)
    assert "PhysioNet" in pm.licence
    assert (pi.dataset, pi.allowed) == ("iu_xray", True)
    assert "CC BY-NC-ND 4.0" in pi.licence and "Demner-Fushman" in pi.citation


def test_unknown_tree_is_restricted_and_marker_overrides(trees, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("hello")
    pol = publish.policy(odd)
    assert (pol.dataset, pol.allowed) == ("unknown", False)
    assert not publish.policy(tmp_path / "does-not-exist").allowed
    # a marker in a phantom tree can withdraw permission ...
    ph = tmp_path / "ph"
    write_phantom(ph, studies=2, size=32, seed=2, workers=1)
    (ph / DATASET_MARKER).write_text(json.dumps({"dataset": "private_copy", "name": "in-house data",
                                                 "redistributable": False, "licence": "internal"}))
    pol = publish.policy(ph)
    assert (pol.dataset, pol.name, pol.allowed, pol.licence) == ("private_copy", "in-house data", False, "internal")
    # ... and one in a real-looking tree can grant it
    (odd / DATASET_MARKER).write_text(json.dumps({"dataset": "chexpert_plus", "redistributable": True,
                                                  "licence": "a special agreement"}))
    pol = publish.policy(odd)
    assert (pol.dataset, pol.allowed, pol.licence) == ("chexpert_plus", True, "a special agreement")
    (odd / DATASET_MARKER).write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(ValueError, match="redistributable"):
        publish.policy(odd)




@pytest.mark.skipif(not openi_available(), reason="NLMCXR_reports.tgz (torchxrayvision) not available")
def test_iu_phantom_is_publishable(tmp_path):
    out = write_iu_phantom(tmp_path / "iu", size=32, seed=0, limit=4, workers=1)
    pol = publish.policy(out)
    assert (pol.dataset, pol.allowed) == ("iu_phantom", True)
    assert "CC BY-NC-ND 4.0" in pol.licence
    (out / DATASET_MARKER).unlink()           # an older tree: recognised by mesh_mapping.json
    pol = publish.policy(out)
    assert (pol.dataset, pol.allowed) == ("iu_phantom", True)


def test_guarded_stage3_examples(trees, monkeypatch):
    """Notebook 03's example cell: nothing drawn or displayed from a restricted tree without the opt-in."""
    from cxpmrg_lib.chapters import viz

    root = trees["restricted"]
    table = pd.read_csv(root / "df_chexpert_plus_240401.csv", dtype=str, keep_default_na=False)
    image = "PNG/" + table["path_to_image"][0].replace(".jpg", ".png")
    examples = pd.DataFrame({"study_id": ["a"], "image_path": [image],
                             "reference": [table["section_findings"][0]], "prediction": ["No acute disease."],
                             "reference findings": ["-"], "generated findings": ["-"]})
    shown, drawn = [], []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    monkeypatch.setattr(viz, "report_examples", lambda *a, **k: drawn.append(a) or "figure")
    assert publish.show_report_examples(publish.policy(root), examples, root) is None
    assert drawn == [] and len(shown) == 1
    assert "Not shown" in shown[0].data and SECRET not in shown[0].data.lower()
    shown.clear()
    out = publish.show_report_examples(publish.policy(root, allow_restricted=True), examples, root)
    assert out == "figure" and len(drawn) == 1 and isinstance(shown[0], pd.DataFrame)


def test_redact_check_drops_examples(trees):
    report = {"problems": [{"problem": "empty report", "count": 1, "examples": [f"{SECRET} text"]}]}
    assert publish.redact_check(report, publish.policy(trees["restricted"]))["problems"][0]["examples"] == []
    assert publish.redact_check(report, publish.policy(trees["phantom"]))["problems"][0]["examples"] == [f"{SECRET} text"]


def _image_cells(nb) -> set[str]:
    """First source line of every code cell with an image output."""
    out = set()
    for cell in nb.cells:
        if cell.cell_type == "code" and any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            out.add(cell.source.splitlines()[0])
    return out


@pytest.mark.skipif(not openi_available(), reason="notebook 00 needs NLMCXR_reports.tgz (torchxrayvision)")
@pytest.mark.slow      # two notebook runs, about 15 s each on 2 cores
@pytest.mark.parametrize("opt_in", [False, True])
def test_data_notebook_on_restricted_tree(trees, nb_work, opt_in):
    from cxpmrg_lib.chapters.pipeline import SMOKE_PARAMS, execute_notebook

    work = nb_work
    params = dict(SMOKE_PARAMS, data_root=str(work / "data"), run_root=str(work / "runs"),
                  dataset_root=str(trees["restricted"]), publish_restricted=opt_in)
    out = work / f"00_{opt_in}.ipynb"
    execute_notebook(ROOT / "notebooks" / "00_data.ipynb", out, params)
    nb = nbformat.read(out, as_version=4)
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells]).lower()
    grid = 'if publish.guard(policy, "sample radiographs"):'
    images = _image_cells(nb)
    if opt_in:
        assert SECRET in outputs                       # the table preview quotes the reports
        assert grid in images
    else:
        assert SECRET not in outputs
        assert grid not in images
        assert "not shown: sample radiographs" in outputs and "publish_restricted true" in outputs
        # what remains are aggregates and the (publishable) iu-phantom
        allowed = ("label_prevalence", "report_lengths", "iu_", "openi")
        assert all(any(a in line for a in allowed) for line in images), images
        assert "data:image" not in outputs
