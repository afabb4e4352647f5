"""The data the training stages hold in memory: decoded once, uint8, reused every epoch.

Re-decoding PNGs every epoch costs more than training the tiny preset on a CPU, so a
split small enough (MAX_CACHED_BYTES) is decoded once; bigger ones stream from disk.
"""
from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import Dataset
from cxpmrg_lib.util.progress import tqdm

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LOADER", "MAX_CACHED_BYTES", "ImageTensorDataset", "StudyTensorDataset", "load_split", "split_table",
           "load_studies"]

# In-memory image caches above this size stream from disk instead.
MAX_CACHED_BYTES = 2 * 1024 ** 3
# CheXpert Plus ships train/valid only; the study uses the findings section and a 70/10/20 patient
# split (R2Gen trees keep their own split and ignore both). The notebooks pass the same by default.
DEFAULT_LOADER = {"section": "findings", "split": "patient"}


def split_table(dataset_root, split: str, kind: str, limit: int | None, loader: dict | None):
    from cxpmrg_lib.data import load_study_table

    table = load_study_table(dataset_root, kind=kind, **(DEFAULT_LOADER if loader is None else loader))
    table = table[table["split"] == split].reset_index(drop=True)
    if limit is not None:
        table = table.iloc[: int(limit)]
    if table.empty:
        raise ValueError(f"{dataset_root} has no studies in split {split!r}")
    return table


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 (N, 1, S, S); items are float tensors in [-1, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float().div_(127.5).sub_(1.0)


class _StreamedImages(Dataset):
    """The first image of each study, read from disk per item (datasets too big for memory)."""

    def __init__(self, studies):
        self.studies = studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> torch.Tensor:
        # A study whose only image cannot be read (on_bad_image="skip") lends the next study's image,
        # so that an epoch never stops for one file; the dataset logs the file from its worker.
        for k in range(len(self.studies)):
            item = self.studies[(i + k) % len(self.studies)]
            if bool(item["image_mask"][0]):
                if "bad_images" in item:
                    log.warning("skipped unreadable image(s): %s", "; ".join(item["bad_images"]))
                return item["image"][0]
            log.warning("study %s has no readable image (%s); using the next study", item["study_id"],
                        "; ".join(item.get("bad_images", [])))
        raise RuntimeError("no study of this split has a readable image")


def load_split(dataset_root: str | os.PathLike, image_size: int, split: str = "train", kind: str = "auto",
               limit: int | None = None, loader: dict | None = None, num_workers: int = 2,
               on_bad_image: str = "skip"):
    """(images, table) of one split: every study's first (frontal) image as a Dataset of (1, S, S)
    tensors in [-1, 1], and the study table rows in the same order.

    Small datasets are decoded once into memory (uint8), since re-decoding PNGs every epoch
    would cost more than the training on a CPU.
    """
    studies, table = load_studies(dataset_root, image_size, split, kind, limit, loader, max_images=1,
                                  num_workers=num_workers, on_bad_image=on_bad_image)
    if isinstance(studies, StudyTensorDataset):
        images = ImageTensorDataset(studies.images[:, 0])
        images.bad_images = studies.bad_images
        return images, table
    return _StreamedImages(studies), table


class StudyTensorDataset(Dataset):
    """Studies held in memory: uint8 views (N, M, 1, S, S) with a view mask, reports and labels.

    Items look like `cxpmrg_lib.data.dataset.StudyDataset`'s (image in [-1, 1], image_mask,
    report, labels, study_id); `collate_studies` stacks them.
    """

    def __init__(self, images: torch.Tensor, mask: torch.Tensor, reports: list[str], labels: torch.Tensor,
                 study_ids: list[str]):
        self.images, self.mask, self.reports, self.labels, self.study_ids = images, mask, reports, labels, study_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].float().div_(127.5).sub_(1.0), "image_mask": self.mask[i],
                "report": self.reports[i], "labels": self.labels[i], "study_id": self.study_ids[i]}


def load_studies(dataset_root: str | os.PathLike, image_size: int, split: str = "train", kind: str = "auto",
                 limit: int | None = None, loader: dict | None = None, max_images: int = 2,
                 num_workers: int = 2, on_bad_image: str = "skip"):
    """(studies, table) of one split with up to `max_images` views each, reports and labels.

    Decoded once into memory when small enough; otherwise the disk-backed StudyDataset.
    `on_bad_image="skip"` leaves unreadable views out, drops a study with no readable view
    (from `studies` and `table` alike) and logs how many and which; the list is kept as
    `studies.bad_images`. "error" stops at the first unreadable file, naming it.
    """
    from cxpmrg_lib.data.dataset import StudyDataset, collate_studies

    table = split_table(dataset_root, split, kind, limit, loader)
    studies = StudyDataset(table, dataset_root, image_size=image_size, max_images=max_images,
                           on_bad_image=on_bad_image)
    if len(table) * max_images * image_size ** 2 > MAX_CACHED_BYTES:
        log.info("streaming %d %s studies from disk (too many to hold in memory)", len(table), split)
        studies.bad_images = []           # counted as they are met, batch by batch (collate_studies)
        return studies, table
    images = torch.empty(len(table), max_images, 1, image_size, image_size, dtype=torch.uint8)
    mask = torch.zeros(len(table), max_images, dtype=torch.bool)
    labels = torch.empty(len(table), 14)
    kept: list[str] = []
    bad: list[str] = []
    dl = torch.utils.data.DataLoader(studies, batch_size=64, num_workers=num_workers, collate_fn=collate_studies)
    done = 0
    for batch in tqdm(dl, desc=f"decode {split} studies", unit="batch", leave=False):
        n = len(batch["image"])
        images[done: done + n] = ((batch["image"] + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        mask[done: done + n] = batch["image_mask"]
        labels[done: done + n] = batch["labels"]
        kept += batch["study_id"]
        bad += batch.get("bad_images", [])
        done += n
    if bad:
        lost = len(table) - done
        log.warning("%s split: skipped %d unreadable image(s)%s; first: %s", split, len(bad),
                    f", dropping {lost} study(ies) left without any image" if lost else "", "; ".join(bad[:3]))
    if done < len(table):
        table = table.set_index(table["study_id"].astype(str)).loc[kept].reset_index(drop=True)
        images, mask, labels = images[:done], mask[:done], labels[:done]
    reports = dict(zip(studies.study_ids, studies.reports))
    out = StudyTensorDataset(images, mask, [reports[i] for i in kept], labels, kept)
    out.bad_images = bad
    return out, table
