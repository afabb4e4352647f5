"""Bad input for the training stages: unreadable images are skipped and counted (or stop the run,
naming the file), over-long reports are counted, and run folders that cannot serve say why."""
import logging
from types import SimpleNamespace

import pytest
import yaml

from cxpmrg_lib.data.dataset import StudyDataset, collate_studies
from cxpmrg_lib.data.images import ImageLoadError
from cxpmrg_lib.data.phantom import write_phantom
from cxpmrg_lib.util.errors import RunError
from cxpmrg_lib.stages.studies import load_split, load_studies, split_table
from cxpmrg_lib.stages.common import StageConfig, require_run
from cxpmrg_lib.stages.report import _count_truncated


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("bad") / "phantom", studies=24, size=32, seed=3, workers=1)


@pytest.fixture()
def broken(phantom, tmp_path):
    """A copy of the phantom with the first training study's image replaced by garbage bytes."""
    import shutil

    root = tmp_path / "phantom"
    shutil.copytree(phantom, root)
    table = split_table(root, "train", "auto", None, None)
    rel = list(table["image_paths"][0])[0]
    (root / rel).write_bytes(b"this is not a png")
    return root, str(table["study_id"][0]), rel


def test_load_studies_skips_and_counts_unreadable_image(broken, caplog):
    root, sid, rel = broken
    full = split_table(root, "train", "auto", None, None)
    with caplog.at_level(logging.WARNING):
        studies, table = load_studies(root, 32, "train", max_images=1, num_workers=0)
    assert len(studies.bad_images) == 1 and rel in studies.bad_images[0]
    assert len(studies) == len(table) == len(full) - 1          # its only image is gone: the study is dropped
    assert sid not in set(studies.study_ids) and sid not in set(table["study_id"].astype(str))
    assert list(table["study_id"].astype(str)) == studies.study_ids
    assert studies.reports == [str(r) for r in table["report"]]  # rows still line up with the table
    assert "skipped 1 unreadable image" in caplog.text and rel in caplog.text
    images, _ = load_split(root, 32, "train", num_workers=0)
    assert len(images) == len(full) - 1 and len(images.bad_images) == 1


def test_load_studies_error_mode_names_the_file(broken):
    root, _, rel = broken
    with pytest.raises(ImageLoadError, match=rel.split("/")[-1]):
        load_studies(root, 32, "train", max_images=1, num_workers=0, on_bad_image="error")


def test_streaming_dataset_skips_views_and_collate_drops_empty_studies(broken):
    root, sid, rel = broken
    table = split_table(root, "train", "auto", None, None)
    ds = StudyDataset(table, root, image_size=32, max_images=2, on_bad_image="skip")
    item = ds[0]
    assert not bool(item["image_mask"].any()) and rel in item["bad_images"][0]
    batch = collate_studies([ds[i] for i in range(4)])
    assert batch["study_id"] == [str(s) for s in table["study_id"][1:4]]
    assert batch["dropped_studies"] == [sid] and len(batch["bad_images"]) == 1
    assert batch["image"].shape[0] == 3
    with pytest.raises(ImageLoadError):
        collate_studies([ds[0]])                                  # nothing left to train on
    with pytest.raises(ImageLoadError):
        StudyDataset(table, root, image_size=32, on_bad_image="error")[0]


def test_stage_config_rejects_unknown_bad_image_policy():
    with pytest.raises(ValueError, match="on_bad_image"):
        StageConfig(dataset_root="x", on_bad_image="ignore")


def test_count_truncated_reports(caplog):
    tok = lambda text, add_special_tokens=False: {"input_ids": text.split()}  # noqa: E731
    head = SimpleNamespace(tokenizer=tok, max_report_tokens=5)
    with caplog.at_level(logging.WARNING):
        n = _count_truncated(head, ["a b c", "a b c d e f g", "", "1 2 3 4 5 6"])
    assert n == 2 and "2 of 4 training reports are longer than 5 tokens (longest 7)" in caplog.text


def _fake_run(tmp_path, stage, preset="tiny", finished=True):
    run = tmp_path / stage / "abc"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"config": {"preset": preset}, "resolved": {"stage": stage}}))
    if finished:
        (run / "summary.json").write_text("{}")
    return run


def test_require_run_names_what_is_wrong(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        require_run(tmp_path / "nope", "finetune")
    with pytest.raises(RunError, match="no config.yaml"):
        require_run(tmp_path, "finetune")
    lm = _fake_run(tmp_path, "report_lm")
    with pytest.raises(RunError, match="is a report-LM run, not a stage-3"):
        require_run(lm, "finetune")
    s1 = _fake_run(tmp_path, "autoregressive", preset="tiny")
    with pytest.raises(RunError, match="preset 'tiny', not 'base'"):
        require_run(s1, "autoregressive", "base")
    assert require_run(s1, "autoregressive", "tiny") == s1
    half = _fake_run(tmp_path, "finetune", finished=False)
    with pytest.raises(RunError, match="unfinished stage-3"):
        require_run(half, "finetune")


def test_generate_cli_reports_bad_run_and_bad_image(tmp_path, capsys):
    from cxpmrg_lib.cli import main

    lm = _fake_run(tmp_path, "report_lm")
    img = tmp_path / "x.png"
    img.write_bytes(b"junk")
    assert main(["generate", "--run", str(lm), str(img)]) == 2
    assert "report-LM run, not a stage-3" in capsys.readouterr().err
