"""The phantom writers: layout, determinism, labels vs truth, prevalence, findings in the pixels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxpmrg_lib.data.openi import openi_available
from cxpmrg_lib.data.phantom import (CHEXPERT_PLUS_COLUMNS, Anatomy, Finding, StudySpec, expected_prevalence,
                                     mesh_to_findings, render_study, sample_study_spec, write_iu_phantom,
                                     write_phantom)
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("ph") / "a", studies=60, size=128, seed=3, workers=2)


def test_same_seed_same_bytes_across_workers_and_seed_changes(phantom, tmp_path):
    again = write_phantom(tmp_path / "b", studies=60, size=128, seed=3, workers=1)
    assert tree_hash(phantom) == tree_hash(again)
    other = write_phantom(tmp_path / "c", studies=60, size=128, seed=4, workers=1)
    assert tree_hash(other) != tree_hash(phantom)


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(phantom, tmp_path):
    with pytest.raises(FileExistsError):
        write_phantom(phantom, studies=5, size=64)
    with pytest.raises(Exception):
        write_phantom(tmp_path / "bad", studies=0)
    assert not (tmp_path / "bad").exists()


def test_csv_columns_images_and_splits(phantom):
    df = pd.read_csv(phantom / "df_chexpert_plus_240401.csv", keep_default_na=False)
    assert list(df.columns) == CHEXPERT_PLUS_COLUMNS and len(CHEXPERT_PLUS_COLUMNS) == 27
    assert len(df) == 60
    assert set(df["split"]) == {"train", "valid"}
    for split, g in df.groupby("deid_patient_id")["split"]:
        assert g.nunique() == 1  # split by patient
    assert df["deid_patient_id"].value_counts().max() > 1  # some patients have several studies
    assert df["path_to_image"].str.fullmatch(r"(train|valid)/patient\d{5}/study\d+/view1_frontal\.jpg").all()
    for rel in df["path_to_image"]:
        im = Image.open(phantom / "PNG" / rel.replace(".jpg", ".png"))
        assert im.size == (128, 128) and im.mode == "L"
    assert (df["section_impression"] != "").all()
    rep = df["report"].iloc[0]
    assert "IMPRESSION:" in rep and df["section_impression"].iloc[0] in rep
    assert "SYNTHETIC" in (phantom / "README.txt").read_text()


def test_labels_agree_with_truth(phantom):
    truth = pd.read_csv(phantom / "phantom_truth.csv", keep_default_na=False)
    df = pd.read_csv(phantom / "df_chexpert_plus_240401.csv", keep_default_na=False)
    for name in ("findings", "impression"):
        rows = [json.loads(x) for x in (phantom / "chexbert_labels" / f"{name}_fixed.json").read_text().splitlines()]
        assert [r["path_to_image"] for r in rows] == list(df["path_to_image"])
        for r in rows:
            assert set(r) == {"path_to_image", *CHEXPERT_LABELS}
            assert all(v in (None, 1.0, 0.0, -1.0) for k, v in r.items() if k != "path_to_image")
            t = truth[truth["path_to_image"] == r["path_to_image"]]
            present = {o: u == "True" or u is True for o, u in zip(t["observation"], t["uncertain"])}
            empty = all(r[k] is None for k in CHEXPERT_LABELS)
            if empty:
                assert name == "findings"  # studies without a findings section
                continue
            abnormal = any(r[k] in (1.0, -1.0) for k in CHEXPERT_LABELS[:12])
            assert r["No Finding"] == (None if abnormal else 1.0)
            for o in CHEXPERT_LABELS[:13]:
                if r[o] in (1.0, -1.0):  # every positive/hedged mention is a drawn finding ...
                    assert o in present, (r["path_to_image"], o)
                    assert (r[o] == -1.0) == present[o]  # ... hedged exactly when the truth says so
                if o not in present:
                    assert r[o] in (None, 0.0)
            if name == "findings":  # the findings section mentions every drawn finding
                for o in present:
                    if o != "No Finding":
                        assert r[o] in (1.0, -1.0), (r["path_to_image"], o)


def test_prevalence_matches_the_table():
    exp = expected_prevalence()
    n = 400
    counts = {o: 0 for o in CHEXPERT_LABELS}
    for i in range(n):
        spec = sample_study_spec(np.random.default_rng([11, i]))
        obs = {f.observation for f in spec.findings}
        for o in obs:
            counts[o] += 1
        if not obs - {"Support Devices"}:
            counts["No Finding"] += 1
    assert 0.27 < counts["No Finding"] / n < 0.41
    for o in CHEXPERT_LABELS:
        sd = (exp[o] * (1 - exp[o]) / n) ** 0.5
        assert abs(counts[o] / n - exp[o]) < 4 * sd + 0.01, (o, counts[o] / n, exp[o])


def _pair(finding: Finding, size=128, seed=0, anatomy=None):
    a = anatomy or Anatomy()
    base = render_study(StudySpec(a, ()), size, np.random.default_rng(seed)).astype(float)
    with_f = render_study(StudySpec(a, (finding,)), size, np.random.default_rng(seed)).astype(float)
    return base, with_f


def _xi(x, size=128):
    return int((x + 1) / 2 * size)


def _yi(y, size=128):
    return int(y / 2 * size)


def test_same_rng_without_finding_is_identical():
    a, b = _pair(Finding("Pleural Effusion", "left", severity="small"))
    c = render_study(StudySpec(Anatomy(), ()), 128, np.random.default_rng(0)).astype(float)
    assert np.array_equal(a, c)


def test_cardiomegaly_widens_the_bright_heart_band():
    base, big = _pair(Finding("Cardiomegaly", severity="severe"))
    row = _yi(Anatomy().dome_r - 0.12)
    inner = slice(_xi(-0.75), _xi(0.75))  # inside the chest wall: lung (dark) or heart (bright)
    thr = 0.5 * (base[row, _xi(-0.55)] + base[row, _xi(0.05)])  # between lung and heart
    width = lambda im: int((im[row, inner] > thr).sum())  # noqa: E731
    assert width(big) > width(base) + 8, (width(big), width(base))


def test_each_finding_changes_its_region():
    a = Anatomy()
    cases = [  # finding, (x0, x1, y0, y1) region in x/y coordinates, expected sign of the change
        (Finding("Pleural Effusion", "left", severity="moderate"), (0.5, 0.8, a.dome_r + 0.02, a.dome_r + a.cp_depth + 0.04), +1),
        (Finding("Pleural Effusion", "right", severity="small"), (-0.82, -0.62, a.dome_r + 0.04, a.dome_r + a.cp_depth), +1),
        (Finding("Pneumothorax", "right", severity="large"), (-0.8, -0.65, 0.5, 1.0), -1),
        (Finding("Consolidation", "right", "lower"), (-0.6, -0.3, 1.05, 1.35), +1),
        (Finding("Pneumonia", "left", "upper"), (0.3, 0.6, 0.45, 0.75), +1),
        (Finding("Lung Opacity", "left", "lower"), (0.3, 0.7, 1.0, 1.35), +1),
        (Finding("Lung Lesion", "right", "upper", kind="mass"), (-0.7, -0.2, 0.4, 0.9), +1),
        (Finding("Edema", "bilateral", severity="moderate"), (0.15, 0.5, 0.8, 1.1), +1),
        (Finding("Atelectasis", "left", "base", severity="moderate"), (0.3, 0.7, 1.2, 1.45), +1),
        (Finding("Enlarged Cardiomediastinum", severity="moderate"), (-0.3, 0.35, 0.5, 0.8), +1),
        (Finding("Pleural Other", "right", "apex"), (-0.7, -0.2, 0.2, 0.55), +1),
        (Finding("Fracture", "left", "middle"), (0.45, 0.8, 0.6, 1.3), 0),
        (Finding("Support Devices", kind="pacemaker", side="left"), (0.45, 0.7, 0.3, 0.5), +1),
        (Finding("Support Devices", kind="ett"), (-0.05, 0.05, 0.1, 0.5), +1),
        (Finding("Support Devices", kind="sternal_wires"), (-0.05, 0.05, 0.6, 1.1), +1),
        (Finding("Support Devices", kind="picc", side="right"), (-0.9, -0.3, 0.3, 0.6), +1),
    ]
    for f, (x0, x1, y0, y1), sign in cases:
        base, with_f = _pair(f, anatomy=a)
        rs, cs = slice(_yi(y0), _yi(y1)), slice(_xi(x0), _xi(x1))
        diff = (with_f - base)[rs, cs]
        if f.observation == "Support Devices":  # thin metal: a few very bright pixels
            assert diff.max() > 40, f
        elif sign == 0:  # a fracture moves rib pixels both ways
            assert np.abs(diff).mean() > 1.0, f
        else:
            assert sign * diff.mean() > 2.0, (f, diff.mean())
        if f.side in ("left", "right") and f.observation != "Support Devices":  # drawn on its own side
            change = np.abs(with_f - base)
            own = change[:, 64:].sum() if f.side == "left" else change[:, :64].sum()
            assert own > 0.85 * change.sum(), f


def test_effusion_severity_raises_the_fluid_level():
    a = Anatomy()
    col = slice(_xi(0.5), _xi(0.75))
    heights = []
    for sev in ("small", "moderate", "large"):
        base, eff = _pair(Finding("Pleural Effusion", "left", severity=sev), anatomy=a)
        changed = np.where(((eff - base)[:, col]).mean(axis=1) > 10)[0]
        heights.append(len(changed))
    assert heights[0] < heights[1] < heights[2]


def test_render_is_size_independent_and_varies_per_study():
    spec = sample_study_spec(np.random.default_rng(5))
    for size in (64, 128, 256, 320):
        im = render_study(spec, size, np.random.default_rng(1))
        assert im.shape == (size, size) and im.dtype == np.uint8
    a = render_study(sample_study_spec(np.random.default_rng(1)), 128, np.random.default_rng(0))
    b = render_study(sample_study_spec(np.random.default_rng(2)), 128, np.random.default_rng(0))
    assert np.abs(a.astype(int) - b).mean() > 3


def test_mesh_mapping_examples():
    assert mesh_to_findings("normal", ()) == []
    (f,) = mesh_to_findings("Pleural Effusion", ("left", "small"))
    assert (f.observation, f.side, f.severity) == ("Pleural Effusion", "left", "small")
    (f,) = mesh_to_findings("Opacity", ("lung", "base", "left"))
    assert (f.observation, f.side, f.zone) == ("Lung Opacity", "left", "base")
    (f,) = mesh_to_findings("Cardiomegaly", ("mild",))
    assert f.severity == "mild"
    for term in (("Calcified Granuloma", ()), ("Spondylosis", ()), ("Thoracic Vertebrae", ("degenerative",)),
                 ("Hernia, Hiatal", ()), ("Aorta", ("tortuous",))):
        assert mesh_to_findings(*term) is None




@pytest.mark.skipif(not openi_available(), reason="cxpmrg_lib.data.openi or NLMCXR_reports.tgz not available")
def test_iu_phantom_subset(tmp_path):
    out = write_iu_phantom(tmp_path / "iu", size=96, seed=0, limit=60, workers=1)
    ann = json.loads((out / "annotation.json").read_text())
    items = ann["train"] + ann["val"] + ann["test"]
    assert len(items) == 60 and len(ann["train"]) == 42 and len(ann["val"]) == 6 and len(ann["test"]) == 12
    for split, rows in ann.items():
        for it in rows:
            assert it["split"] == split and it["report"].strip()
            assert it["image_path"] == [f"{it['id']}/0.png", f"{it['id']}/1.png"]
            for p in it["image_path"]:
                assert Image.open(out / "images" / p).size == (96, 96)
    m = json.loads((out / "mesh_mapping.json").read_text())
    assert m["mapped_terms"] == sum(m["mapped"].values()) and m["unmapped_terms"] == sum(m["unmapped"].values())
    assert m["mapped"].get("normal", 0) > 0 and m["unmapped_terms"] > 0


def test_loads_through_the_loaders(phantom, tmp_path):
    cp = pytest.importorskip("cxpmrg_lib.data.chexpert_plus", reason="chexpert_plus loader not written yet")
    df = cp.load_chexpert_plus(phantom)
    assert len(df) > 0
    if openi_available():
        r2 = pytest.importorskip("cxpmrg_lib.data.r2gen", reason="r2gen loader not written yet")
        out = write_iu_phantom(tmp_path / "iu", size=64, seed=1, limit=20, workers=1)
        assert len(r2.load_r2gen(out, dataset="iu_xray")) == 20


# ----------------------------------------------------------------------------- fast-path building blocks
def test_png_writer_round_trips_through_pil():
    import io

    from cxpmrg_lib.data.phantom.writer import _png_bytes

    rng = np.random.default_rng(0)
    img = render_study(sample_study_spec(rng), 256, rng)
    for im in (img, rng.integers(0, 256, (37, 53)).astype(np.uint8), np.zeros((1, 1), np.uint8)):
        data = _png_bytes(im)
        back = Image.open(io.BytesIO(data))
        back.load()
        assert back.mode == "L" and back.size == im.shape[::-1]
        assert np.array_equal(np.asarray(back), im)
    assert len(_png_bytes(img)) < 0.8 * img.size  # the filter + entropy coding do compress


def test_segments_equal_the_brute_force_stroke():
    from cxpmrg_lib.data.phantom.render import _bezier, _canvas

    cv = _canvas(96)
    pts = np.concatenate([_bezier((0.6, 0.3), (0.1, 0.2), (-0.05, 0.9), 8), _bezier((-0.05, 0.9), (-0.2, 1.2), (0.3, 1.6), 6)[1:]])
    width, value = 0.02, 0.8
    got = np.zeros((96, 96), np.float32)
    cv.polyline(got, pts, width, value)
    # distance of every pixel centre to the nearest segment, by brute force in float64
    X, Y = np.meshgrid(cv.x.astype(float), cv.y.astype(float))
    dist = np.full(X.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1].astype(float), pts[1:].astype(float)):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.minimum(dist, np.hypot(X - x0 - t * dx, Y - y0 - t * dy))
    soft = max(cv.px, width / 2)
    want = value * np.clip((width - dist) / soft + 0.5, 0, 1)
    assert np.abs(got - want).max() < 1e-4
    assert (want > 0.5).sum() > 100  # the stroke is really there


def test_upsampling_and_positioning_match_pil():
    from cxpmrg_lib.data.phantom.render import _affine, _affine_to, _upsample2

    img = (np.random.default_rng(1).random((40, 40)) * 200).astype(np.float32)
    pil = np.asarray(Image.fromarray(img, mode="F").resize((80, 80), Image.BILINEAR))
    assert np.abs(_upsample2(img) - pil).max() < 1e-3
    ours, ref = _affine(img, 3.0, 1.04, 0.03, -0.02), _affine_to(img, 40, 3.0, 1.04, 0.03, -0.02)
    assert np.abs(ours - ref)[3:-3, 3:-3].max() < 0.05  # same warp inside the frame
    assert np.abs(_affine(img, 0.0, 1.0, 0.0, 0.0) - img).max() < 1e-3  # identity


def test_odd_sizes_take_the_general_path():
    spec = sample_study_spec(np.random.default_rng(8))
    for size in (97, 161):  # 161 px: drawn at 81 px, warped straight to 161
        im = render_study(spec, size, np.random.default_rng(2))
        assert im.shape == (size, size) and 60 < im.mean() < 200
    small = render_study(spec, 160, np.random.default_rng(2)).astype(float)
    odd = np.asarray(Image.fromarray(render_study(spec, 161, np.random.default_rng(2))).resize((160, 160), Image.BILINEAR))
    assert np.abs(small - odd).mean() < 12  # the same picture, up to grain and resampling
