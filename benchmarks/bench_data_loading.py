"""Data-loading speed: decode + resize 256-px PNGs to 128 px through the DataLoader.

Goal: >= 400 images/s with 2 worker processes (the CPU default). The images are
1,000 synthetic 256-px 8-bit PNGs (smooth shapes plus noise, so they compress
like radiographs, ~40-60 kB each), written to a temporary folder.

    .venv/bin/python -m pytest -m benchmark -s benchmarks/bench_data_loading.py
    .venv/bin/python benchmarks/bench_data_loading.py
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxpmrg_lib.data.dataset import make_loader
from cxpmrg_lib.data.images import load_image
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

N_IMAGES, SIZE, OUT = 1000, 256, 128


def write_images(root: Path, n: int = N_IMAGES, size: int = SIZE, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        body = 0.6 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r ** 2)))
        img = 0.2 + body + 0.15 * np.sin(20 * y + i) * (x > 0.5) + rng.normal(0, 0.04, (size, size))
        p = f"img/{i:05d}.png"
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(root / p)
        rows.append({"study_id": f"s{i}", "image_paths": [p], "findings": "", "impression": "",
                     "report": "x .", "split": "train", **{c: np.nan for c in CHEXPERT_LABELS}})
    return pd.DataFrame(rows)


def measure(root: Path, df: pd.DataFrame, num_workers: int = 2, batch_size: int = 32) -> dict:
    t0 = time.perf_counter()
    for p in df.image_paths[:200]:
        load_image(root / p[0], OUT)
    single = 200 / (time.perf_counter() - t0)
    loader = make_loader(df, root, image_size=OUT, batch_size=batch_size, shuffle=True,
                         num_workers=num_workers, max_images=1)
    rates = []
    for epoch in range(2):  # epoch 1 includes starting the workers; epoch 2 reuses them
        n = 0
        t0 = time.perf_counter()
        for batch in loader:
            n += int(batch["image_mask"].sum())
        rates.append(n / (time.perf_counter() - t0))
    return {"images": n, "single_process_img_s": single, "loader_img_s": rates[0], "loader_img_s_epoch2": rates[1],
            "workers": num_workers}


@pytest.mark.benchmark
def test_bench_data_loading(tmp_path):
    df = write_images(tmp_path)
    kb = sum((tmp_path / p[0]).stat().st_size for p in df.image_paths) / len(df) / 1024
    res = measure(tmp_path, df)
    print(f"\n{res['images']} PNGs of {SIZE} px ({kb:.0f} kB each) -> {OUT} px: "
          f"load_image alone {res['single_process_img_s']:.0f} img/s (1 process); "
          f"DataLoader with {res['workers']} workers {res['loader_img_s']:.0f} img/s in epoch 1 (with worker start), "
          f"{res['loader_img_s_epoch2']:.0f} img/s in epoch 2 (goal >= 400)")
    assert res["images"] == N_IMAGES


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        test_bench_data_loading(Path(d))


@pytest.mark.benchmark
def test_bench_openi_reports():
    from cxpmrg_lib.util.errors import DataError
    from cxpmrg_lib.data.openi import find_openi_reports, load_openi_reports

    try:
        path = find_openi_reports()
    except DataError:
        pytest.skip("NLMCXR_reports.tgz not available")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        df = load_openi_reports(path)
        times.append(time.perf_counter() - t0)
    print(f"\nOpen-i: {len(df)} reports read from the tgz in {min(times):.2f} s (best of 3; goal: a few seconds)")
    assert len(df) == 3955
