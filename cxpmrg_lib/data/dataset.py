"""The study table as a torch Dataset: one item per study, its images stacked and padded.

A study has one to a few images (IU X-Ray: frontal + lateral; MIMIC-CXR: one);
models take a fixed number of image slots, so each item holds `max_images` slots
(frontal first, extras dropped) with a mask saying which slots are real. Padding
slots are zeros and must be ignored through the mask.

Everything the workers need is copied out of the DataFrame into plain lists at
construction, so that items are cheap to fetch and the dataset pickles small.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from cxpmrg_lib.data.images import ImageLoadError, load_image
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

__all__ = ["StudyDataset", "collate_studies", "make_loader", "seed_worker"]


class StudyDataset(Dataset):
    """Items: dict(image=(max_images, 1, S, S) float, image_mask=(max_images,) bool,
    report=str, labels=(14,) float with NaN for unknown, study_id=str).

    Pixels are loaded in [0, 1] (see images.load_image), passed through `transform`
    (a callable on one (1, S, S) tensor, e.g. augmentation) and then normalised as
    (x - mean) / std; the defaults map [0, 1] to [-1, 1].

    `on_bad_image`: "error" raises ImageLoadError naming the file; "skip" leaves the view
    out (the study keeps its readable views) and lists it in the item's `bad_images`
    ("path: reason"); `collate_studies` then drops a study left with no view at all.
    """

    def __init__(self, df: pd.DataFrame, root: str | os.PathLike, image_size: int = 128, max_images: int = 2,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, mean: float = 0.5,
                 std: float = 0.5, report_column: str = "report", on_bad_image: str = "error"):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        missing = [c for c in ("study_id", "image_paths", report_column) if c not in df.columns]
        if missing:
            raise ValueError(f"study table lacks column(s) {missing}")
        self.root = str(Path(root))
        self.image_size = int(image_size)
        self.max_images = int(max_images)
        self.transform = transform
        self.mean, self.std = float(mean), float(std)
        self.study_ids = [str(s) for s in df["study_id"]]
        self.image_paths = [[os.path.join(self.root, p) for p in list(ps)[: self.max_images]]
                            for ps in df["image_paths"]]
        self.reports = ["" if not isinstance(r, str) else r for r in df[report_column]]
        cols = [c for c in CHEXPERT_LABELS]
        if all(c in df.columns for c in cols):
            self.labels = df[cols].to_numpy(dtype=np.float32)
        else:
            self.labels = np.full((len(df), len(cols)), np.nan, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.study_ids)

    def load_images(self, i: int, bad: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_images, 1, S, S) views and their mask; with on_bad_image="skip", unreadable views are
        appended to `bad` and left out (readable ones move up)."""
        s = self.image_size
        image = np.zeros((self.max_images, 1, s, s), dtype=np.float32)
        mask = np.zeros(self.max_images, dtype=bool)
        scale, shift = np.float32(1.0 / self.std), np.float32(self.mean / self.std)
        k = 0
        for path in self.image_paths[i]:
            try:
                x = load_image(path, s)
            except ImageLoadError as e:
                if self.on_bad_image == "error" or bad is None:
                    raise
                bad.append(f"{e.path}: {e.reason}")
                continue
            if self.transform is not None:
                x = np.asarray(self.transform(torch.from_numpy(x).unsqueeze(0)), dtype=np.float32)[0]
            np.multiply(x, scale, out=image[k, 0])
            image[k, 0] -= shift
            mask[k] = True
            k += 1
        return torch.from_numpy(image), torch.from_numpy(mask)

    def __getitem__(self, i: int) -> dict:
        bad: list[str] = []
        image, mask = self.load_images(i, bad)
        item = {"image": image, "image_mask": mask, "report": self.reports[i],
                "labels": torch.from_numpy(self.labels[i].copy()), "study_id": self.study_ids[i]}
        if bad:
            item["bad_images"] = bad
        return item


def collate_studies(batch: list[dict]) -> dict:
    """Stack tensors (image (B, M, 1, S, S), image_mask (B, M), labels (B, 14)); keep strings as lists.

    Unreadable views skipped by the dataset are listed in `bad_images`; a study left with no
    readable view is dropped from the batch (and its id listed in `dropped_studies`).
    """
    bad = [x for b in batch for x in b.get("bad_images", ())]
    dropped = [b["study_id"] for b in batch if "bad_images" in b and not bool(b["image_mask"].any())]
    if dropped:
        batch = [b for b in batch if not ("bad_images" in b and not bool(b["image_mask"].any()))]
        if not batch:
            raise ImageLoadError(bad[0].split(": ")[0], "no study of this batch has a readable image: "
                                 + "; ".join(bad[:3]))
    out = {"image": torch.stack([b["image"] for b in batch]),
           "image_mask": torch.stack([b["image_mask"] for b in batch]),
           "labels": torch.stack([b["labels"] for b in batch]),
           "report": [b["report"] for b in batch],
           "study_id": [b["study_id"] for b in batch]}
    if bad:
        out["bad_images"], out["dropped_studies"] = bad, dropped
    return out


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's set-up: one torch thread (the workers are the parallelism; threads inside
    them would only fight them) and numpy's and random's seeds from torch's per-worker seed."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(df: pd.DataFrame, root: str | os.PathLike, image_size: int = 128, batch_size: int = 16,
                shuffle: bool = False, num_workers: int = 2, seed: int = 0, max_images: int = 2,
                transform: Callable | None = None, drop_last: bool = False, **dataset_kw) -> DataLoader:
    """A DataLoader over StudyDataset; the shuffle order and worker seeds follow `seed`.

    Workers persist across epochs (starting them costs about a second each epoch otherwise).
    """
    ds = StudyDataset(df, root, image_size=image_size, max_images=max_images, transform=transform, **dataset_kw)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_studies, generator=g, drop_last=drop_last,
                      worker_init_fn=seed_worker if num_workers > 0 else None,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
