"""detect_kind / check_tree / format_check / load_study_table dispatch."""

import pytest

import cxpmrg_lib.data as data
from cxpmrg_lib.data.check import check_tree, detect_kind, format_check
from cxpmrg_lib.util.errors import DataError

from test_data_chexpert_plus import make_tree as make_chexpert
from test_data_openi import good, make_tgz
from test_data_r2gen import make_tree as make_r2gen


def test_detect_kind(tmp_path):
    (tmp_path / "a").mkdir()
    make_chexpert(tmp_path / "a")
    (tmp_path / "b").mkdir()
    make_r2gen(tmp_path / "b")
    tgz = make_tgz(tmp_path / "NLMCXR_reports.tgz", {"ecgen-radiology/1.xml": good(1)})
    assert detect_kind(tmp_path / "a") == "chexpert_plus"
    assert detect_kind(tmp_path / "b") == "r2gen"
    assert detect_kind(tgz) == "openi" and detect_kind(tmp_path) == "openi"
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="cannot tell what dataset"):
        detect_kind(tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        detect_kind(tmp_path / "zzz")


def test_check_chexpert_with_problems(tmp_path):
    make_chexpert(tmp_path)
    p = tmp_path / "PNG/train/patient1/study2/view1_frontal.png"
    p.write_bytes(p.read_bytes()[:20])  # corrupt
    (tmp_path / "PNG/valid/patient4/study1/view1_frontal.png").unlink()  # missing
    rep = check_tree(tmp_path)
    assert rep["kind"] == "chexpert_plus"
    assert rep["studies"] == {"train": 3, "val": 0, "test": 0}
    assert rep["images"] == 4 and rep["images_per_study"] == {1: 2, 2: 1}
    assert rep["label_prevalence"]["Cardiomegaly"] == pytest.approx(1 / 3, abs=1e-4)
    assert rep["label_prevalence"]["Edema"] == 0.0  # -1 is not positive
    probs = {p["problem"]: p["count"] for p in rep["problems"]}
    assert probs == {"dropped: missing image file": 1, "dropped: no findings text": 1,
                     "unreadable image (in a sample of 4)": 1}
    assert rep["report_length"]["max_words"] == 4  # "lungs clear . no pneumothorax ."
    text = format_check(rep)
    assert "studies: train 3, val 0, test 0 (total 3)" in text
    assert "1 x dropped: missing image file" in text and "view1_frontal.png" in text
    assert rep["fatal"] and "FATAL" in text  # an undecodable image would stop training
    assert "Cardiomegaly" in text and "0.333" in text


def test_check_r2gen_and_openi(tmp_path):
    make_r2gen(tmp_path)
    rep = check_tree(tmp_path)
    assert rep["dataset"] == "iu_xray" and rep["studies"] == {"train": 3, "val": 1, "test": 1}
    assert rep["problems"] == [] and rep["label_prevalence"] == {} and not rep["fatal"]
    assert "problems: none" in format_check(rep) and "labels: none" in format_check(rep)
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": good(1), "ecgen-radiology/2.xml": b"<x"})
    rep = check_tree(tgz)
    assert rep["studies"] == {"all": 1} and rep["images"] == 2
    assert rep["problems"][0]["problem"] == "malformed report XML" and rep["problems"][0]["count"] == 1
    assert "1 x malformed report XML" in format_check(rep)


def test_load_study_table_dispatch(tmp_path):
    (tmp_path / "a").mkdir()
    make_chexpert(tmp_path / "a")
    (tmp_path / "b").mkdir()
    make_r2gen(tmp_path / "b")
    assert data.load_study_table(tmp_path / "a").attrs["kind"] == "chexpert_plus"
    assert len(data.load_study_table(tmp_path / "a", section="impression")) == 4
    assert data.load_study_table(tmp_path / "b").attrs["kind"] == "r2gen"
    # CheXpert-only options are ignored for an R2Gen tree; unknown names still fail
    assert len(data.load_study_table(tmp_path / "b", section="findings", split="patient", seed=1)) == 5
    with pytest.raises(TypeError):
        data.load_study_table(tmp_path / "b", sektion="findings")
    make_tgz(tmp_path / "c.tgz", {"ecgen-radiology/1.xml": good(1)})
    with pytest.raises(DataError, match="load_openi_reports"):
        data.load_study_table(tmp_path / "c.tgz")
    assert data.StudyDataset.__name__ == "StudyDataset"
