"""Open-i report loading: the real archive and hand-made bad archives."""
import io
import logging
import tarfile

import pytest

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.openi import MeshTerm, find_openi_reports, load_openi_reports, parse_mesh_term

GOOD = b"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR%d"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough</AbstractText>
<AbstractText Label="FINDINGS">Heart size normal. Lungs are clear.</AbstractText>
<AbstractText Label="IMPRESSION"/>
</Abstract></Article></MedlineCitation>
<MeSH><major>Cardiomegaly/mild</major><major>Pleural Effusion/ Left /small</major><minor>Spine/degenerative</minor></MeSH>
<parentImage id="CXR%d_1_IM-0001-3001"/><parentImage id="CXR%d_1_IM-0001-4001"/>
</eCitation>"""


def make_tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good(i):
    return GOOD % (i, i, i)


@pytest.fixture(scope="module")
def real():
    try:
        path = find_openi_reports()
    except DataError:
        pytest.skip("NLMCXR_reports.tgz not available")
    return load_openi_reports(path)


def test_real_archive(real):
    assert len(real) == 3955
    assert list(real.uid[:3]) == ["CXR1", "CXR2", "CXR3"]
    cxr1 = real.iloc[0]
    assert cxr1.xml_name == "ecgen-radiology/1.xml"
    assert cxr1.findings.startswith("The cardiac silhouette and mediastinum size are within normal limits")
    assert cxr1.impression == "Normal chest x-XXXX."
    assert cxr1.indication == "Positive TB test"
    assert cxr1.mesh_major == ["normal"]
    assert cxr1.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert (real.findings != "").sum() == 3425
    assert (real.impression != "").sum() == 3921
    assert real.image_ids.map(len).value_counts()[2] == 3208
    assert real.attrs["skipped"] == [] and real.attrs["decoded_with_fallback"] == []


def test_real_normal_count(real):
    # Reports whose only major term is "normal": 1,391 in the public archive.
    n_normal = real.mesh_major.map(lambda t: [parse_mesh_term(x).is_normal for x in t] == [True]).sum()
    assert n_normal == 1391


def test_parse_mesh_term():
    t = parse_mesh_term("Pleural Effusion/ Left /small")
    assert t == MeshTerm("Pleural Effusion", ("left", "small"), "Pleural Effusion/ Left /small")
    assert parse_mesh_term("normal").is_normal and parse_mesh_term("normal").qualifiers == ()
    assert parse_mesh_term("Technical Quality of Image Unsatisfactory ").heading == \
        "Technical Quality of Image Unsatisfactory"
    assert parse_mesh_term("Catheters, Indwelling/right//").qualifiers == ("right",)
    assert parse_mesh_term("No Indexing").is_unindexed
    with pytest.raises(TypeError):
        parse_mesh_term(None)


def test_small_archive_columns(tmp_path):
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/10.xml": good(10), "ecgen-radiology/2.xml": good(2)})
    df = load_openi_reports(tgz)
    assert list(df.uid) == ["CXR2", "CXR10"]  # numeric, not lexical, order
    assert df.iloc[0].mesh_major == ["Cardiomegaly/mild", "Pleural Effusion/ Left /small"]
    assert df.iloc[0].mesh_minor == ["Spine/degenerative"]
    assert df.iloc[0].impression == "" and df.iloc[0].findings == "Heart size normal. Lungs are clear."


def test_malformed_xml_raise_names_member(tmp_path):
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": good(1),
                                        "ecgen-radiology/2.xml": b"<eCitation><uId id='CXR2'/><MeSH>"})
    with pytest.raises(DataError, match=r"ecgen-radiology/2\.xml"):
        load_openi_reports(tgz)


def test_malformed_xml_skip_counts(tmp_path, caplog):
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": good(1),
                                        "ecgen-radiology/2.xml": b"<eCitation><uId id='CXR2'/><MeSH>",
                                        "ecgen-radiology/3.xml": b"<eCitation/>",
                                        "ecgen-radiology/4.xml": good(4)})
    with caplog.at_level(logging.WARNING, logger="cxpmrg_lib.data.openi"):
        df = load_openi_reports(tgz, on_error="skip")
    assert list(df.uid) == ["CXR1", "CXR4"]
    assert [m for m, _ in df.attrs["skipped"]] == ["ecgen-radiology/2.xml", "ecgen-radiology/3.xml"]
    assert "skipped 2 malformed" in caplog.text


def test_non_utf8_bytes_do_not_crash(tmp_path):
    bad = good(5).replace(b"Lungs are clear.", b"Lungs are clear \xe9\x96 ok.")
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/5.xml": bad})
    df = load_openi_reports(tgz)
    assert df.iloc[0].findings == "Heart size normal. Lungs are clear \u00e9\u2013 ok."
    assert df.attrs["decoded_with_fallback"] == ["ecgen-radiology/5.xml"]


def test_find_paths(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="torchxrayvision==1.5.7"):
        find_openi_reports(tmp_path / "nope.tgz")
    tgz = make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": good(1)})
    monkeypatch.setenv("CXPMRG_OPENI_TGZ", str(tgz))
    assert find_openi_reports() == tgz
    monkeypatch.setenv("CXPMRG_OPENI_TGZ", str(tmp_path / "missing.tgz"))
    with pytest.raises(DataError, match="CXPMRG_OPENI_TGZ"):
        find_openi_reports()


def test_not_an_archive(tmp_path):
    p = tmp_path / "r.tgz"
    p.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="r.tgz"):
        load_openi_reports(p)
