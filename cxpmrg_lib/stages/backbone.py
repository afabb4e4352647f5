"""Backbone pre-training for the benchmark's systems whose image network starts from scratch.

The papers of the Transformer baseline, R2Gen, R2GenCMN, CvT2DistilGPT2 and R2GenGPT start their
image networks from ImageNet checkpoints. No such weights exist here, and trained from scratch in
the shared budget these systems write one report for every study (the most-common floor). The
stand-in is a short supervised pre-training of the same backbone on the training split: its
study features (tokens averaged over tokens and views) feed a linear head that predicts the 14
observations, positive or uncertain, with binary cross-entropy. The labels are read from the
training reports (the dataset's label files, the rule labeller where a study has none), so the
backbone sees no information that MambaXray-VL's stage 2, which contrasts images with those same
reports, does not. The head is thrown away; the decoder never sees a label. The benchmark's
matched MambaXray-VL row (not the paper's) takes the same step on its stage-2 encoder before
stage 3 (FinetuneConfig.encoder_pretraining).

Systems whose backbones start from the same weights (the Transformer, R2Gen, R2GenCMN and the
mechanism systems share one CNN at one seed) get the same pre-trained backbone, as their papers
share one ImageNet checkpoint: `shared_pretrain_backbone` trains it once per starting point and
the others load it (in the default book that saves four of five runs of the CNN's backbone step).

The second objective, "contrastive", is MambaXray-VL's stage 2 on the system's own backbone: its
pooled study features against a fresh text encoder's report features, CLIP loss, at stage 2's
learning rate. It is the same pre-training MambaXray-VL's encoder gets (without stage 1), for a
comparison that holds the pre-training signal equal; on the default phantom it ends R2Gen's
collapse more weakly than the labels do at the same step count (the benchmark chapter).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.zoo.common import pool_views
from cxpmrg_lib.runs import config_hash
from cxpmrg_lib.util import runlock
from cxpmrg_lib.util.fileio import atomic_path, write_json
from cxpmrg_lib.util.progress import tqdm

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "TokenEncoder", "finding_targets", "pretrain_backbone", "shared_pretrain_backbone",
           "weights_digest"]

OBJECTIVES = ("labels", "contrastive")
_LR = {"labels": 1e-3, "contrastive": 5e-4}     # from-scratch rate; stage 2's rate


def finding_targets(studies) -> torch.Tensor:
    """(N, 14) float targets of a StudyDataset: 1 where a study's report states an observation as
    positive or uncertain, else 0. Labels a source lacks (NaN) come from the rule labeller."""
    labels = np.asarray(studies.labels, dtype=np.float32)
    if np.isnan(labels).all(axis=1).any():
        from cxpmrg_lib.labels.labeler import label_reports

        ruled = label_reports(list(studies.reports)).to_numpy(dtype=np.float32)
        labels = np.where(np.isnan(labels), ruled, labels)
    labels = np.nan_to_num(labels, nan=0.0)
    return torch.from_numpy(((labels == 1.0) | (labels == -1.0)).astype(np.float32))


class TokenEncoder(nn.Module):
    """An image network with the Vision Mamba interface that ReportModel and ContrastiveModel read:
    `(x).tokens` (from `extract`, by default the network itself) and `.config` (dim, image_size)."""

    def __init__(self, backbone: nn.Module, dim: int, image_size: int | None = None, extract: Callable | None = None):
        super().__init__()
        if extract is backbone:
            extract = None
        if isinstance(extract, nn.Module):       # a second name for a module would tie weights in the state dict
            raise TypeError("extract is a function of the backbone's input, not another module")
        self.backbone, self._extract = backbone, extract
        self.config = SimpleNamespace(dim=dim, image_size=image_size)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(tokens=self.backbone(x) if self._extract is None else self._extract(x))


def _labels_objective(backbone, extract, studies, dim: int, seed: int):
    targets = finding_targets(studies)
    if targets.sum() == 0:
        raise ValueError("no training study states a finding: label pre-training has nothing to learn")
    with torch.random.fork_rng():                     # a reproducible head, whatever ran before
        torch.manual_seed(seed)
        head = nn.Linear(dim, targets.shape[1])

    def loss(batch, idx):
        features = pool_views(extract, batch["image"], batch["image_mask"]).mean(1)
        return F.binary_cross_entropy_with_logits(head(features), targets[idx])

    return head, loss, {"positive_rate": [round(float(r), 4) for r in targets.mean(0)]}


def _contrastive_objective(backbone, extract, studies, dim: int, seed: int, text_config, work_dir):
    from cxpmrg_lib.models.contrastive import ContrastiveModel
    from cxpmrg_lib.models.text_encoder import TextEncoder

    if text_config is None or work_dir is None:
        raise ValueError("contrastive backbone pre-training needs a text encoder config and a folder for its tokenizer")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text = TextEncoder.build(text_config, texts=list(studies.reports), tokenizer_dir=Path(work_dir) / "tokenizer")
        model = ContrastiveModel(TokenEncoder(backbone, dim, extract=extract), text)
    extra = nn.ModuleList([model.text_encoder, model.image_proj, model.text_proj])
    extra.logit_scale = model.logit_scale

    def loss(batch, idx):
        tokens = text.tokenize(batch["report"], device="cpu")
        return model(batch["image"], tokens["input_ids"], tokens["attention_mask"], batch["image_mask"])["loss"]

    return extra, loss, {}


def pretrain_backbone(backbone: nn.Module, extract: Callable[[torch.Tensor], torch.Tensor], studies,
                      objective: str = "labels", steps: int = 300, batch_size: int = 32, lr: float | None = None,
                      weight_decay: float = 0.05, seed: int = 0, text_config=None, work_dir=None,
                      desc: str = "backbone") -> dict:
    """Train `backbone` (whose tokens `extract` returns: (N, C, S, S) -> (N, T, D)) on `studies` for
    `steps` AdamW steps (cosine decay from `lr`, by default the objective's rate) with `objective`
    ("labels": predict the findings; "contrastive": stage 2's CLIP loss against the reports, which
    needs `text_config` and a `work_dir` for the text tokenizer). The backbone keeps its new weights;
    what else was built is dropped. Returns what was done: steps, seconds, first and last loss."""
    from cxpmrg_lib.data.dataset import collate_studies
    from cxpmrg_lib.trainer import adamw

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    lr = _LR[objective] if lr is None else lr
    was_training = backbone.training
    backbone.train()
    probe = collate_studies([studies[0]])
    with torch.no_grad():
        dim = pool_views(extract, probe["image"], probe["image_mask"]).shape[-1]
    if objective == "labels":
        extra, loss_of, record = _labels_objective(backbone, extract, studies, dim, seed)
    else:
        extra, loss_of, record = _contrastive_objective(backbone, extract, studies, dim, seed, text_config, work_dir)
    extra.train()
    optimizer = adamw(list(backbone.parameters()) + list(extra.parameters()), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    first = last = float("nan")
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{desc}: backbone pre-training ({objective})", unit="step", leave=False)
    for step in bar:
        idx = torch.randint(0, len(studies), (min(batch_size, len(studies)),), generator=generator).tolist()
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_of(collate_studies([studies[i] for i in idx]), idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = loss.detach().item()
        first = last if step == 0 else first
        if step % 10 == 0:
            bar.set_postfix(loss=round(last, 4))
    optimizer.zero_grad(set_to_none=True)       # the backbone leaves as a loaded one would: no gradients
    backbone.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("%s: backbone pre-trained (%s) on %d training studies for %d steps in %.0f s (loss %.3f -> %.3f)",
             desc, objective, len(studies), steps, seconds, first, last)
    return {"objective": objective, "steps": steps, "lr": lr, "batch_size": batch_size, "seconds": round(seconds, 2),
            "first_loss": first, "last_loss": last, **record}


def weights_digest(module: nn.Module) -> str:
    """Sixteen hex digits of the sha256 of a module's state (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def shared_pretrain_backbone(cache_root: str | Path, backbone: nn.Module, studies, objective: str = "labels",
                             steps: int = 300, seed: int = 0, text_config=None, desc: str = "backbone") -> dict:
    """pretrain_backbone(backbone, backbone, ...) once per starting point: the result is kept under
    `cache_root`, keyed by the backbone's initial weights, the objective, steps, seed, the training studies
    and the text encoder (contrastive); a later call with the same key loads it instead of training again.
    Two processes asking for one key at once: the second waits for the first (runlock). Returns the record
    of the run that trained it, with `reused` (False for the call that trained it)."""
    text = dataclasses.asdict(text_config) if dataclasses.is_dataclass(text_config) else text_config
    key = config_hash({"weights": weights_digest(backbone), "objective": objective, "steps": steps, "seed": seed,
                       "studies": config_hash({"ids": list(getattr(studies, "study_ids", []))}), "n": len(studies),
                       "text": text if objective == "contrastive" else None})
    folder = Path(cache_root) / f"{objective}_{key}"
    weights, record_path = folder / "backbone.safetensors", folder / "record.json"
    runlock.claim(folder, f"{desc}: backbone pre-training")
    try:
        if record_path.exists() and weights.exists():
            from safetensors.torch import load_file

            backbone.load_state_dict(load_file(str(weights)))
            record = json.loads(record_path.read_text())
            log.info("%s: backbone pre-training (%s, %d steps) reused from %s (trained by %s)", desc, objective,
                     steps, folder, record.get("trained_by", "?"))
            return {**record, "reused": True, "folder": str(folder)}
        from safetensors.torch import save_file

        record = pretrain_backbone(backbone, backbone, studies, objective, steps=steps, seed=seed,
                                   text_config=text_config, work_dir=folder / "work", desc=desc)
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}, str(tmp))
        record = {**record, "trained_by": desc}
        write_json(record_path, record)          # last: its presence says the weights are complete
        return {**record, "reused": False, "folder": str(folder)}
    finally:
        runlock.release(folder)
