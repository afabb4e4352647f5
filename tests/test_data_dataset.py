"""StudyDataset / make_loader: shapes, padding, normalisation, labels, seeded order."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxpmrg_lib.data.dataset import StudyDataset, collate_studies, make_loader
from cxpmrg_lib.data.images import ImageLoadError
from cxpmrg_lib.data.observations import CHEXPERT_LABELS


@pytest.fixture()
def tree(tmp_path):
    rows = []
    for i in range(6):
        paths = []
        for k in range(1 + (i % 3)):  # 1, 2 or 3 images
            p = f"img/s{i}_{k}.png"
            (tmp_path / "img").mkdir(exist_ok=True)
            Image.fromarray(np.full((40, 30), 50 * k + i, np.uint8)).save(tmp_path / p)
            paths.append(p)
        rows.append({"study_id": f"s{i}", "image_paths": paths, "findings": "", "impression": "",
                     "report": f"report {i} .", "split": "train", **{c: np.nan for c in CHEXPERT_LABELS}})
    df = pd.DataFrame(rows)
    df.loc[1, "Cardiomegaly"] = 1.0
    df.loc[1, "Edema"] = -1.0
    return tmp_path, df


def test_item(tree):
    root, df = tree
    ds = StudyDataset(df, root, image_size=16, max_images=2)
    assert len(ds) == 6
    it = ds[1]  # two images
    assert it["image"].shape == (2, 1, 16, 16) and it["image"].dtype == torch.float32
    assert it["image_mask"].tolist() == [True, True]
    # pixel 1 -> 1/255 in [0, 1] -> (x - .5) / .5; pixel 51 -> 51/255
    assert torch.allclose(it["image"][0], torch.full((1, 16, 16), (1 / 255 - 0.5) / 0.5), atol=1e-5)
    assert torch.allclose(it["image"][1], torch.full((1, 16, 16), (51 / 255 - 0.5) / 0.5), atol=1e-5)
    assert it["labels"].shape == (14,) and it["labels"][1] == 1.0 and it["labels"][4] == -1.0
    assert torch.isnan(it["labels"][0])
    assert it["report"] == "report 1 ." and it["study_id"] == "s1"
    one = ds[0]
    assert one["image_mask"].tolist() == [True, False] and (one["image"][1] == 0).all()
    three = ds[2]  # three images, only the first two kept
    assert three["image_mask"].tolist() == [True, True]


def test_transform_and_normalisation(tree):
    root, df = tree
    ds = StudyDataset(df, root, image_size=8, max_images=1, transform=lambda x: 1 - x, mean=0.0, std=1.0)
    assert torch.allclose(ds[0]["image"], torch.full((1, 1, 8, 8), 1.0), atol=1e-6)


def test_collate_and_loader(tree):
    root, df = tree
    batch = collate_studies([StudyDataset(df, root, 8)[i] for i in range(3)])
    assert batch["image"].shape == (3, 2, 1, 8, 8) and batch["image_mask"].shape == (3, 2)
    assert batch["labels"].shape == (3, 14) and batch["study_id"] == ["s0", "s1", "s2"]
    a = [sid for b in make_loader(df, root, 8, batch_size=4, shuffle=True, num_workers=0, seed=7) for sid in b["study_id"]]
    b = [sid for b in make_loader(df, root, 8, batch_size=4, shuffle=True, num_workers=0, seed=7) for sid in b["study_id"]]
    c = [sid for b in make_loader(df, root, 8, batch_size=4, shuffle=True, num_workers=0, seed=8) for sid in b["study_id"]]
    assert a == b and sorted(a) == sorted(df.study_id) and a != c


def test_loader_with_workers(tree):
    root, df = tree
    ids = [sid for b in make_loader(df, root, 8, batch_size=2, num_workers=2) for sid in b["study_id"]]
    assert ids == list(df.study_id)


def test_missing_image_at_load_time_names_file(tree):
    root, df = tree
    (root / "img/s3_0.png").unlink()
    with pytest.raises(ImageLoadError, match=r"s3_0\.png"):
        StudyDataset(df, root, 8)[3]
