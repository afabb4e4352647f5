"""The iu-phantom with R2Gen's split: the reference split files, the membership over the whole
collection, both views, the loader's counts, and the old (random-split) tree left as it was."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cxpmrg_lib import data
from cxpmrg_lib.data.iu_split import (IU_SPLIT_DIR, IU_SPLIT_ENV, find_iu_split, load_iu_split, openi_number,
                                      r2gen_study_id)
from cxpmrg_lib.data.openi import openi_available
from cxpmrg_lib.data.prepare import ensure_iu_phantom, iu_phantom_dir
from cxpmrg_lib.util.errors import DataError

needs_reports = pytest.mark.skipif(not openi_available(), reason="NLMCXR_reports.tgz (IU X-Ray reports) not available")


def test_reference_split_files():
    ref = load_iu_split()
    assert find_iu_split() == IU_SPLIT_DIR and (IU_SPLIT_DIR / "README.md").is_file()
    assert ref["split"].value_counts().to_dict() == {"test": 590, "val": 296}
    assert ref["study_id"].is_unique and ref["number"].is_unique
    assert ref.loc[ref["study_id"] == "CXR2056_IM-0694-1001", "number"].item() == 2056
    assert (ref["n_images"] == 2).all()


def test_split_files_found_elsewhere_or_named(tmp_path, monkeypatch):
    copy = tmp_path / "iu_split"
    shutil.copytree(IU_SPLIT_DIR, copy)
    monkeypatch.setenv(IU_SPLIT_ENV, str(copy))
    assert find_iu_split() == copy and len(load_iu_split()) == 886
    (copy / "test.csv").unlink()
    with pytest.raises(DataError, match=f"test.csv missing.*{IU_SPLIT_ENV}"):
        load_iu_split()
    bad = tmp_path / "bad"
    shutil.copytree(IU_SPLIT_DIR, bad)
    (bad / "valid.csv").write_text((bad / "valid.csv").read_text() + "CXR2279_IM-0865,2279.xml,val,2\n")
    with pytest.raises(DataError, match="listed twice"):
        load_iu_split(bad)


def test_ids_and_numbers():
    assert openi_number("ecgen-radiology/38.xml") == 38 and openi_number("3030.xml") == 3030
    assert r2gen_study_id(["CXR2056_IM-0694-1001-0001", "CXR2056_IM-0694-1001-0002"]) == "CXR2056_IM-0694-1001"
    assert r2gen_study_id(["CXR2279_IM-0865-2001", "CXR2279_IM-0865-3001"]) == "CXR2279_IM-0865"
    with pytest.raises(DataError):
        openi_number("38.txt")


def test_limit_is_shared_in_proportion():
    from cxpmrg_lib.data.phantom.writer import _proportional

    full = {"train": 2451, "val": 296, "test": 590}
    assert _proportional(60, full) == {"train": 44, "val": 5, "test": 11}
    assert _proportional(3, full) == {"train": 1, "val": 1, "test": 1}
    assert _proportional(10_000, full) == full
    assert all(sum(_proportional(n, full).values()) == n for n in (3, 7, 100, 999))


def test_dataset_folder_names():
    assert iu_phantom_dir("d", 128, 0, 400) == Path("d/iu-phantom_n400_128px_s0")  # the book's tree, as before
    assert iu_phantom_dir("d", 128, 0) == Path("d/iu-phantom_128px_s0")
    assert iu_phantom_dir("d", 128, 0, split="r2gen") == Path("d/iu-phantom-r2gen_128px_s0")
    assert iu_phantom_dir("d", 64, 1, 60, split="r2gen") == Path("d/iu-phantom-r2gen_n60_64px_s1")
    with pytest.raises(ValueError):
        iu_phantom_dir("d", 64, 0, split="r2gen-ish")


@needs_reports
def test_r2gen_membership_over_the_whole_collection():
    """Without rendering: every R2Gen val/test study is found with findings and keeps its split, every
    other report with findings and an image trains, and no study is in two splits."""
    from cxpmrg_lib.data.openi import iter_openi_reports, load_openi_reports
    from cxpmrg_lib.data.phantom.writer import _R2GenIU

    sel = _R2GenIU()
    studies = list(sel.stream(iter_openi_reports()))
    ref = load_iu_split()
    by_split = {s: {st["id"] for st in studies if st["split"] == s} for s in ("train", "val", "test")}
    assert by_split["val"] == set(ref.loc[ref["split"] == "val", "study_id"])
    assert by_split["test"] == set(ref.loc[ref["split"] == "test", "study_id"])
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    df = load_openi_reports()
    has = df[(df["findings"].str.strip() != "") & (df["image_ids"].map(len) > 0)]
    assert len(studies) == len(has) == 3337
    assert {len(by_split[s]) for s in ("val", "test")} == {296, 590} and len(by_split["train"]) == 3337 - 886
    info = sel.summary(studies, None)
    assert info["missing"] == [] and info["r2gen_found"] == {"val": 296, "test": 590}
    assert info["two_views"] == {"train": 2069, "val": 296, "test": 590}   # R2Gen's own 2,069 train studies
    assert info["left_out"] == {"no findings section": 530, "findings but no image": 88}


@pytest.fixture(scope="module")
def r2gen_tree(tmp_path_factory):
    if not openi_available():
        pytest.skip("NLMCXR_reports.tgz (IU X-Ray reports) not available")
    root = tmp_path_factory.mktemp("iu")
    return ensure_iu_phantom(root, size=32, seed=0, limit=60, workers=1, split="r2gen")


def test_r2gen_tree_split_views_and_loader(r2gen_tree):
    from cxpmrg_lib.data.openi import load_openi_reports

    out = r2gen_tree
    assert out.name == "iu-phantom-r2gen_n60_32px_s0"
    ann = json.loads((out / "annotation.json").read_text())
    info = json.loads((out / "split.json").read_text())
    assert {s: len(v) for s, v in ann.items()} == info["studies"] == {"train": 44, "val": 5, "test": 11}
    assert info["r2gen_found"] == {"val": 296, "test": 590} and info["missing"] == []
    ref = load_iu_split()
    ref_split = dict(zip(ref["study_id"], ref["split"]))
    images = {r2gen_study_id(x): len(x) for x in load_openi_reports()["image_ids"] if len(x)}
    for split, items in ann.items():
        for it in items:
            assert ref_split.get(it["id"], "train") == split and it["report"].strip()
            views = min(2, images[it["id"]])
            assert it["image_path"] == [f"{it['id']}/{v}.png" for v in range(views)]
            assert sorted(p.name for p in (out / "images" / it["id"]).iterdir()) == [f"{v}.png" for v in range(views)]
    assert sum(len(it["image_path"]) == 2 for v in ann.values() for it in v) == sum(info["two_views"].values()) == 57
    table = data.load_study_table(out)
    assert table["split"].value_counts().to_dict() == {"train": 44, "test": 11, "val": 5}
    assert table["image_paths"].map(len).value_counts().to_dict() == {2: 57, 1: 3}


def _hash(root: Path, names=None) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            if names is None or p.name in names:
                h.update(p.read_bytes())
    return h.hexdigest()


@needs_reports
def test_old_default_tree_unchanged(tmp_path):
    """The random split (the book's iu-phantom) writes what it wrote before the R2Gen split was added:
    the same files, annotation, MeSH summary, README and marker (hashes of the tree the code before it
    wrote; its images were byte-identical too, whole-tree sha256 d4215880... here, left out of the test as
    rendered floats may differ in the last bit between machines)."""
    out = ensure_iu_phantom(tmp_path, size=48, seed=0, limit=40, workers=1)
    assert out.name == "iu-phantom_n40_48px_s0" and not (out / "split.json").exists()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert hashlib.sha256("\n".join(files).encode()).hexdigest() == \
        "c125d93ed382047aeb8b7c185071dec1e5cfd7f748ff0ce8366d4ece027e7d78"
    assert _hash(out, {"annotation.json", "mesh_mapping.json", "README.txt", "dataset_manifest.json"}) == \
        "5daff5b5f9da74e2f1fa96420074c0f38ba5feac0372fe9b90d86e59afaf05d0"


def _small_archive(tmp_path, n=24, extra=None):
    import io
    import tarfile

    xml = ('<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{i}"/><MedlineCitation><Article><Abstract>'
           '<AbstractText Label="FINDINGS">{f}</AbstractText><AbstractText Label="IMPRESSION">No acute disease.'
           '</AbstractText></Abstract></Article></MedlineCitation><MeSH><major>{m}</major></MeSH>{img}</eCitation>')
    members = {}
    for i in range(1, n + 1):
        f = "" if i == 5 else f"Heart size normal, study {i}."                     # 5: impression only
        views = 1 if i % 7 == 0 else 2
        img = "".join(f'<parentImage id="CXR{i}_IM-{i:04d}-{k}001"/>' for k in range(1, views + 1))
        m = "Pleural Effusion/left/small" if i % 3 == 0 else "normal"
        members[f"ecgen-radiology/{i}.xml"] = xml.format(i=i, f=f, m=m, img=img).encode()
    members.update(extra or {})
    tgz = tmp_path / "reports.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    split = tmp_path / "split"
    split.mkdir()
    head = "study_id,openi_xml,split,n_images\n"
    (split / "valid.csv").write_text(head + "".join(f"CXR{i}_IM-{i:04d},{i}.xml,val,2\n" for i in (2, 5)))
    (split / "test.csv").write_text(head + "".join(f"CXR{i}_IM-{i:04d},{i}.xml,test,2\n" for i in (3, 9, 14, 40)))
    return tgz, split


def test_streamed_tree_equals_collected_tree_and_names_the_missing(tmp_path):
    """Without `limit` the studies render while the archive is read; the tree is the one the collected
    path (a `limit` above the total) writes. R2Gen studies without findings or not in the archive are named."""
    from cxpmrg_lib.data.phantom import write_iu_phantom

    tgz, split = _small_archive(tmp_path)
    a = write_iu_phantom(tmp_path / "a", reports=tgz, size=32, workers=1, split="r2gen", split_dir=split)
    b = write_iu_phantom(tmp_path / "b", reports=tgz, size=32, workers=1, split="r2gen", split_dir=split, limit=999)
    assert _hash(a, {"annotation.json", "mesh_mapping.json"}) == _hash(b, {"annotation.json", "mesh_mapping.json"})
    assert _hash(a / "images") == _hash(b / "images")
    info = json.loads((a / "split.json").read_text())
    assert info["studies"] == {"train": 19, "val": 1, "test": 3} and info["r2gen_found"] == {"val": 1, "test": 3}
    assert [(m["study_id"], m["reason"]) for m in info["missing"]] == [
        ("CXR5_IM-0005", "no findings section"), ("CXR40_IM-0040", "not in the reports archive")]
    assert info["two_views"] == {"train": 17, "val": 1, "test": 2}      # 7, 14 (test) and 21 name one image
    assert not (a / "images" / "CXR14_IM-0014" / "1.png").exists()


def test_bad_report_mid_stream_leaves_no_tree(tmp_path):
    from cxpmrg_lib.data.phantom import write_iu_phantom

    tgz, split = _small_archive(tmp_path, extra={"ecgen-radiology/99.xml": b"<eCitation><uId id='CXR99'/><MeSH>"})
    with pytest.raises(DataError, match=r"ecgen-radiology/99\.xml"):
        write_iu_phantom(tmp_path / "out", reports=tgz, size=32, workers=1, split="r2gen", split_dir=split)
    assert not (tmp_path / "out").exists()


def test_a_negative_limit_asks_for_every_report(tmp_path, monkeypatch):
    from cxpmrg_lib.data import phantom, prepare

    seen = {}

    def fake(out, **kw):
        seen.update(kw, out=out)
        return out

    monkeypatch.setattr(phantom, "write_iu_phantom", fake)
    out = prepare.ensure_iu_phantom(tmp_path, 32, 0, limit=-1, split="r2gen")
    assert seen["limit"] is None and out == prepare.iu_phantom_dir(tmp_path, 32, 0, None, split="r2gen")
