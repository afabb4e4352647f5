"""The report explorer: highlighting, per-study scores, case selection, HTML, the widget, publish policy."""
import os

import pandas as pd
import pytest

from cxpmrg_lib.chapters import explore, publish
from cxpmrg_lib.data.phantom import DATASET_MARKER, write_phantom
from cxpmrg_lib.stages.studies import split_table

WRONG = "Cardiomegaly. Large pleural effusion. Pneumothorax. Pulmonary edema. Consolidation."


def test_split_and_normalise():
    assert explore.split_sentences("the heart is normal . lungs are clear .") == ["the heart is normal .",
                                                                               "lungs are clear ."]
    assert explore.split_sentences("No effusion! Stable? ok") == ["No effusion!", "Stable?", "ok"]
    assert explore.split_sentences(None) == [] and explore.split_sentences(" . ") == []
    assert explore.normalise_sentence("  The Heart,  is NORMAL . ") == "the heart is normal"


def test_highlight_marks_exactly_the_shared_sentences():
    ref = "The heart is normal in size. No pleural effusion. There is a small left pneumothorax."
    pred = "the heart is normal in size . there is a large right pneumothorax . the lungs are clear ."
    kinds = explore.sentence_matches(pred, ref)
    assert [k for _, k in kinds] == ["exact", "close", ""]      # 4 of 6 words of the 2nd in one ref sentence
    assert explore.sentence_matches(pred, ref, close=0.7)[1][1] == ""
    out = explore.highlight_sentences(pred, ref)
    assert out.count('class="cx-exact"') == 1 and out.count('class="cx-close"') == 1
    assert '<span class="cx-exact" style="background:#a8e6b0">the heart is normal in size .</span>' in out
    assert "the lungs are clear ." in out and "cx-" not in out.split("pneumothorax .</span>")[1]
    assert "&lt;b&gt;" in explore.highlight_sentences("<b>x</b>.", "y.")      # text is escaped
    assert "empty report" in explore.highlight_sentences("", ref)


def test_study_scores_per_study():
    from cxpmrg_lib.labels.labeler import label_reports

    refs = ["the heart is normal . the lungs are clear .", "small left pleural effusion ."]
    preds = ["the heart is normal . the lungs are clear .", WRONG]
    s = explore.study_scores(refs, preds, label_reports(refs), label_reports(preds))
    assert s["bleu4"][0] == pytest.approx(1.0) and s["rouge_l"][0] == pytest.approx(1.0)
    assert s["bleu4"][1] < 0.01
    # study 2: effusion right (tp 1), 4 other positives wrong (fp 4): F1 = 2/(2+4) = 1/3
    assert s["ce_errors"].tolist()[1] == 4 and s["ce_f1"][1] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A 16-study phantom at 64 px (3 test studies) and a bench folder of two systems:
    'copy' repeats the reference; 'mixed' repeats it for study 0, calls study 1 normal and
    gives study 2 five wrong findings, as 'copy' does too for study 2."""
    base = tmp_path_factory.mktemp("explore")
    root = write_phantom(base / "phantom", studies=16, size=64, seed=0, workers=1)
    test = split_table(root, "test", "auto", None, None)
    ids, refs = test["study_id"].astype(str).tolist(), test["report"].tolist()
    assert len(ids) == 3
    out = base / "bench"
    (out / "predictions").mkdir(parents=True)
    normal = "the cardiac silhouette is normal in size . the lungs are clear ."
    preds = {"copy": [refs[0], refs[1], WRONG], "mixed": [refs[0], normal, WRONG]}
    for slug, p in preds.items():
        pd.DataFrame({"study_id": ids, "reference": refs, "prediction": p}).to_csv(out / "predictions" / f"{slug}.csv",
                                                                                index=False)
    pd.DataFrame({"system": ["copy", "mixed"], "name": ["Copy", "Mixed"], "bleu4": [0.5, 0.3]}).to_csv(
        out / "results.csv", index=False)
    return root, out, ids


def test_load_and_select(bench):
    root, out, ids = bench
    view = explore.load_bench(out, root)
    assert view.policy.allowed and view.systems == {"copy": "Copy", "mixed": "Mixed"}
    assert view.study_ids == ids and all(len(view.image_paths[s]) == 1 for s in ids)
    assert explore.select_cases(view, "best", n=1) == [ids[0]]
    assert explore.select_cases(view, "disagree", n=1) == [ids[1]]
    assert explore.select_cases(view, "ce_error", n=1) == [ids[2]]
    assert explore.select_cases(view, "ce_error", n=3, systems=["mixed"]) == [ids[2], ids[1], ids[0]]
    assert explore.select_cases(view, "finding", n=5, finding="Consolidation") == [ids[1]]
    assert explore.findings_present(view)["Support Devices"] == 1
    with pytest.raises(ValueError, match="preset"):
        explore.select_cases(view, "worst")
    with pytest.raises(ValueError, match="not in"):
        explore.load_bench(out, root, systems=["r2gen"])


def test_render_case_shows_images_labels_scores(bench):
    root, out, ids = bench
    view = explore.load_bench(out, root)
    page = explore.render_case(view, ids[1])
    assert page.count('class="cx-image"') == 1 and "data:image/png;base64," in page
    assert "Copy" in page and "Mixed" in page and "BLEU-4 1.000" in page
    assert view.references[ids[1]].split(" . ")[0] in page
    # 'mixed' called the study normal: its Consolidation, Pneumonia and Support Devices cells are red,
    # and it claims No Finding (4 errors); 'copy' has none
    assert page.count('class="cx-wrong"') == 4 and "label errors 4" in page
    labels = explore.case_table(view, ids[1])
    assert labels.loc["Consolidation", "reference"] == 1.0 and labels.loc["Consolidation", "Mixed"] != 1.0
    with pytest.raises(KeyError):
        explore.render_case(view, "nope")
    html = explore.gallery(view, n=1)
    assert html.count('class="cx-case"') == 3 and "Where systems disagree" in html
    assert "cx-summary" in html


def test_widget_changes_selection(bench):
    root, out, ids = bench
    ex = explore.Explorer(explore.load_bench(out, root))
    assert ex.study.value == ids[1]                        # default: where systems disagree
    assert "Mixed" in ex.output.value
    ex.mode.value = "ce_error"
    assert ex.study.value == ids[2] and ids[2] in ex.output.value
    ex.systems.value = ("copy",)
    assert "Mixed" not in ex.output.value and "Copy" in ex.output.value
    ex.mode.value = "finding"
    ex.finding.value = "Consolidation"
    assert list(ex.study.options) == [ids[1]]
    ex.mode.value = "id"
    ex.study.value = ids[0]
    assert ids[0] in ex.output.value
    ex.bench.value = str(out / "missing")
    ex.reload()
    assert "could not load" in ex.status.value


def test_restricted_dataset_shows_aggregates_only(bench, tmp_path):
    root, out, ids = bench
    pol = publish.PublishPolicy(dataset="chexpert_plus", name="CheXpert Plus", redistributable=False, allowed=False,
                                licence="research use only", reason="test")
    view = explore.load_bench(out, root, policy=pol)
    secret = view.references[ids[1]].split(" . ")[0]
    page = explore.render_case(view, ids[1])
    assert "Not shown" in page and secret not in page and "data:image" not in page
    html = explore.gallery(view, n=1)
    assert "cx-summary" in html and "Not shown" in html
    assert secret not in html and "data:image" not in html and 'class="cx-case"' not in html
    ex = explore.Explorer(view)
    assert secret not in ex.output.value and "Not shown" in ex.status.value
    # the same through the tree: a copy of the phantom without its marker files looks like CheXpert Plus
    import shutil

    fake = tmp_path / "cxp"
    shutil.copytree(root, fake)
    for name in ("phantom_truth.csv", "README.txt", DATASET_MARKER):
        os.remove(fake / name)
    assert not explore.load_bench(out, fake).policy.allowed
    assert explore.load_bench(out, fake, allow_restricted=True).policy.allowed


@pytest.mark.slow      # one notebook run, about 10 s on 2 cores
def test_explore_notebook_reuses_the_bench(bench, tmp_path):
    """06_explore on a benchmark folder already in place (as 04 leaves it): gallery, no widget, no run."""
    import json
    import shutil
    from pathlib import Path

    import nbformat

    from cxpmrg_lib.bench import BenchConfig, bench_dir
    from cxpmrg_lib.chapters.pipeline import SMOKE_PARAMS, execute_notebook

    root, out, ids = bench
    run_root = tmp_path / "runs"
    target = bench_dir(BenchConfig(dataset_root=str(root), run_root=str(run_root), preset="tiny"))
    shutil.copytree(out, target)
    dst = tmp_path / "06.ipynb"
    execute_notebook(Path(__file__).resolve().parents[1] / "notebooks" / "06_explore.ipynb", dst,
                     dict(SMOKE_PARAMS, data_root=str(tmp_path / "data"), run_root=str(run_root),
                          dataset_root=str(root)))
    nb = nbformat.read(dst, as_version=4)
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert outputs.count('class=\\"cx-case\\"') == 3                 # 3 test studies, each shown once
    assert "Where systems disagree" in outputs and "data:image/png;base64" in outputs
    assert "widget-view" not in outputs and "live = True" in outputs
    assert not (tmp_path / "data").exists()                           # nothing generated, nothing trained
    assert sorted(p.name for p in target.iterdir()) == ["predictions", "results.csv"]
