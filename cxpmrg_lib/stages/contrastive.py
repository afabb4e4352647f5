"""Stage 2: X-ray/report contrastive pre-training (models/contrastive.py), cached by config hash."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.data.dataset import collate_studies
from cxpmrg_lib.presets import get_preset
from cxpmrg_lib.stages.autoregressive import AutoregressiveConfig, load_autoregressive, pretrain_autoregressive
from cxpmrg_lib.stages.common import StageConfig, require_run, resolve_device, start_run, finish_run

log = logging.getLogger(__name__)

__all__ = ["ContrastiveConfig", "pretrain_contrastive", "contrastive_runs", "contrastive_embeddings", "contrastive_retrieval",
           "load_contrastive", "four_way_encoder"]


@dataclass
class ContrastiveConfig(StageConfig):
    """Stage 2. `init`: "stage1" starts the 4-way encoder from stage 1 (trained or reused with the
    same dataset, preset and seed), "random" skips stage 1 (the ablation row)."""
    init: str = "stage1"
    max_studies: int | None = None
    max_images: int = 2                  # views per study, averaged after pooling
    text_pretrained: str | None = None   # a local BERT-family checkpoint (e.g. Bio_ClinicalBERT)
    checkpoint_every: int = 100
    stage1_epochs: float | None = None   # passed to stage 1 when it has to be trained

    preset_defaults = "stage2"

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("stage1", "random"):
            raise ValueError(f"init must be 'stage1' or 'random', not {self.init!r}")

    def stage1_config(self) -> AutoregressiveConfig:
        return AutoregressiveConfig(**self.shared(), epochs=self.stage1_epochs)


def _text_config(config: ContrastiveConfig):
    from dataclasses import replace

    text = get_preset(config.preset).text
    return replace(text, pretrained=config.text_pretrained) if config.text_pretrained else text


def four_way_encoder(preset_name: str, stage1_dir: Path | None):
    """The 4-way encoder, its direction weights copied from a stage-1 run when given."""
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba, expand_to_four_way

    cfg = EncoderConfig(**{**get_preset(preset_name).encoder.to_dict(), "scan": "4-way"})
    encoder = VisionMamba(cfg)
    if stage1_dir is not None:
        arm = load_autoregressive(require_run(stage1_dir, "autoregressive", preset_name))
        encoder.load_state_dict(expand_to_four_way(arm.encoder.state_dict()), strict=True)
    return encoder


def pretrain_contrastive(config: ContrastiveConfig) -> Path:
    """Stage 2: CLIP-style training of the 4-way image encoder and the text encoder; returns the run directory.

    Besides the trainer's files the directory holds text_encoder/ (with its tokenizer) and
    summary.json with image->report and report->image recall@1/5/10 on val and test.
    """
    from cxpmrg_lib.models.contrastive import ContrastiveModel
    from cxpmrg_lib.models.text_encoder import TextEncoder
    from cxpmrg_lib.stages.studies import load_studies
    from cxpmrg_lib.trainer import TrainConfig, train

    preset = get_preset(config.preset)
    settings = config.train_settings()
    stage1_dir = pretrain_autoregressive(config.stage1_config()) if config.init == "stage1" else None
    text_cfg = _text_config(config)
    payload = {**config.payload("contrastive"), "max_studies": config.max_studies,
               "max_images": config.max_images, "init": config.init,
               "stage1": stage1_dir.name if stage1_dir else None, "encoder": preset.encoder.to_dict(),
               "text": text_cfg.to_dict(), "proj_dim": preset.proj_dim, "train": settings}
    run_dir, finished = start_run(config, "contrastive", payload, "stage 2")
    if finished:
        return run_dir
    size = preset.encoder.image_size
    studies, table = load_studies(config.dataset_root, size, "train", config.dataset_kind, config.max_studies,
                                  config.loader, config.max_images, on_bad_image=config.on_bad_image)
    torch.manual_seed(config.seed)
    tok_dir = run_dir / "tokenizer"
    if text_cfg.pretrained:
        text_encoder = TextEncoder.build(text_cfg)
    elif tok_dir.exists():                     # an interrupted run: same tokenizer as before
        text_encoder = TextEncoder.build(text_cfg, tokenizer=tok_dir)
    else:
        text_encoder = TextEncoder.build(text_cfg, texts=list(table["report"]), tokenizer_dir=tok_dir)
    model = ContrastiveModel(four_way_encoder(config.preset, stage1_dir), text_encoder, preset.proj_dim)

    def collate(batch):
        out = collate_studies(batch)
        out.update(text_encoder.tokenize(out["report"], device="cpu"))
        return out

    def loss_fn(m, batch):
        out = m(batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_mask"])
        return out["loss"], {"temperature": float(out["temperature"])}

    device = resolve_device(config.device)
    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=device, **settings)
    result = train(model, studies, loss_fn, train_config, run_dir, collate_fn=collate,
                   batch_size_of=lambda b: int(b["image_mask"].sum()),
                   model_config={"encoder": preset.encoder.to_dict(), "text": text_cfg.to_dict(),
                                 "proj_dim": preset.proj_dim},
                   desc=f"stage 2 (contrastive, {config.init} init)")
    text_encoder.save_pretrained(run_dir / "text_encoder", overwrite=True)
    model.cpu().eval()
    retrieval = {split: contrastive_retrieval(model, config.dataset_root, split, config.dataset_kind,
                                              config.loader, config.max_images)
                 for split in ("val", "test")}
    finish_run(run_dir, {"stage": "contrastive", "config_hash": run_dir.name, "init": config.init,
                                          "stage1_run": str(stage1_dir) if stage1_dir else None,
                                          "steps": result.steps, "final_loss": result.final_loss,
                                          "train_studies": len(studies), "retrieval": retrieval,
                                          "skipped_images": len(getattr(studies, "bad_images", [])),
                                          "preset": config.preset, "dataset": payload["dataset"]})
    return run_dir


def contrastive_runs(configs: dict[str, ContrastiveConfig], jobs: int = 0) -> dict[str, Path]:
    """Several stage-2 runs (02_contrastive's stage-1 and random inits): name -> run directory.
    Stage 1 is trained first, here, when a run needs it; then the runs train side by side in
    `jobs` worker processes (cxpmrg_lib.util.parallel; 0: automatic)."""
    from cxpmrg_lib.util.parallel import map_parallel

    for config in configs.values():
        if config.init == "stage1":
            pretrain_autoregressive(config.stage1_config())
    device = next(iter(configs.values())).device if configs else "cpu"
    return dict(zip(configs, map_parallel(pretrain_contrastive, list(configs.values()), jobs, device,
                                          labels=[f"stage 2 {name}" for name in configs], desc="stage 2")))


@torch.no_grad()
def contrastive_embeddings(model, dataset_root, split: str = "val", kind: str = "auto", loader: dict | None = None,
                           max_images: int = 2, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, "object"]:
    """(image embeddings, report embeddings, study table) of one split, in eval mode."""
    from cxpmrg_lib.stages.studies import load_studies

    size = model.image_encoder.config.image_size
    studies, table = load_studies(dataset_root, size, split, kind, None, loader, max_images)
    was = model.training
    model.eval()
    imgs, txts = [], []
    for start in tqdm(range(0, len(studies), batch_size), desc=f"embed {split}", unit="batch", leave=False):
        items = [studies[i] for i in range(start, min(start + batch_size, len(studies)))]
        batch = collate_studies(items)
        toks = model.text_encoder.tokenize(batch["report"])
        imgs.append(model.embed_images(batch["image"], batch["image_mask"]))
        txts.append(model.embed_texts(toks["input_ids"], toks["attention_mask"]))
    model.train(was)
    return torch.cat(imgs), torch.cat(txts), table


def contrastive_retrieval(model, dataset_root, split: str = "val", kind: str = "auto", loader: dict | None = None,
                          max_images: int = 2) -> dict[str, float]:
    """Recall@1/5/10 both ways on one split; identical report texts count as the same item."""
    from cxpmrg_lib.models.contrastive import retrieval_recall

    img, txt, table = contrastive_embeddings(model, dataset_root, split, kind, loader, max_images)
    groups = [" ".join(str(r).lower().split()) for r in table["report"]]
    out = retrieval_recall(img, txt, groups=groups)
    out["n"] = len(table)
    out["distinct_reports"] = len(set(groups))
    return out


def load_contrastive(run_dir: str | os.PathLike):
    """The trained ContrastiveModel of a finished stage-2 run (CPU, eval mode)."""
    from cxpmrg_lib.models.contrastive import ContrastiveModel
    from cxpmrg_lib.models.text_encoder import TextEncoder
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
    from cxpmrg_lib.trainer import load_weights

    run_dir = require_run(run_dir, "contrastive")
    cfg_path = run_dir / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    encoder = VisionMamba(EncoderConfig(**{**cfg["encoder"], "scan": "4-way"}))
    model = ContrastiveModel(encoder, TextEncoder.from_pretrained(run_dir / "text_encoder"), cfg["proj_dim"])
    return load_weights(model, run_dir / "model").eval()
