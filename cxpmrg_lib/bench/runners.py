"""How each kind of system is trained and writes its test reports (`RUNNERS`, by System.kind): the floors,
the word-level encoder-decoders of the zoo, the conv-ViT systems on report LMs, MambaXray-VL (stage 3
itself) and the language-model swap on the frozen stage-2 encoder."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxpmrg_lib.bench.config import BenchConfig, bench_dir
from cxpmrg_lib.bench.systems import System
from cxpmrg_lib.bench.training import (_count, _Data, _elapsed, _fit, _Fitted, _generate, _lm_budget, _lm_epochs,
                                       _pretrain_seconds, _projection_scale, _report_lm_dir, _stage2_run,
                                       _test_decoding, _train)
from cxpmrg_lib.runs import read_summary
from cxpmrg_lib.util.fileio import write_json

log = logging.getLogger(__name__)


def _run_most_common(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    counts = pd.Series(list(data.train.reports)).value_counts()
    best = counts.index[0]
    return _Fitted([best] * len(data.test), None, 0.0, 0, 0,
                   note=f"{counts.iloc[0]} of {len(data.train)} training reports are this one")


class _NearestNeighbour(torch.nn.Module):
    """Copies the training report whose stage-2 image embedding is closest (cosine) to the study's."""

    def __init__(self, contrastive, train_embeddings: torch.Tensor, reports: list[str]):
        super().__init__()
        self.model, self.bank, self.reports = contrastive, train_embeddings, reports

    @torch.no_grad()
    def generate(self, images, image_mask=None, **_decoding) -> list[str]:
        query = self.model.embed_images(images, image_mask)
        return [self.reports[i] for i in (query @ self.bank.T).argmax(1).tolist()]


def _embed_studies(contrastive, studies, batch_size: int = 64) -> torch.Tensor:
    from cxpmrg_lib.data.dataset import collate_studies

    out = []
    with torch.no_grad():
        for start in range(0, len(studies), batch_size):
            b = collate_studies([studies[i] for i in range(start, min(start + batch_size, len(studies)))])
            out.append(contrastive.embed_images(b["image"], b["image_mask"]))
    return torch.cat(out)


def _run_nearest(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.stages.contrastive import load_contrastive

    stage2 = _stage2_run(config)
    model = load_contrastive(stage2).eval()
    t0 = time.perf_counter()
    bank = _embed_studies(model, data.train)
    nn_model = _NearestNeighbour(model, bank, list(data.train.reports))
    preds = _generate(nn_model, data.test, config)
    _, total = _count(model)
    return _Fitted(preds, nn_model, time.perf_counter() - t0, 0, total, pretrain_s=_pretrain_seconds(stage2),
                   run_dir=str(stage2), note="train time: embedding the training studies; the stage-2 run is reused")


def _word_setup(config: BenchConfig, data: _Data, run_dir: Path):
    from cxpmrg_lib.models.zoo.common import WordVocab

    path = run_dir / "vocab.json"
    vocab = WordVocab.load(path) if path.exists() else WordVocab.build(data.train.reports, config.min_word_count)
    if not path.exists():
        vocab.save(path)
    typical = int(np.median([len(WordVocab.split(r)) for r in data.train.reports]))
    return vocab, typical


def _zoo_model(name: str, vocab, config: BenchConfig, typical: int, image_size: int):
    if name == "transformer":
        from cxpmrg_lib.models.zoo.transformer import TransformerConfig, TransformerReportModel

        return TransformerReportModel(vocab, TransformerConfig(image_size=image_size), config.max_words, typical)
    if name == "r2gen":
        from cxpmrg_lib.models.zoo.r2gen import R2Gen, R2GenConfig

        return R2Gen(vocab, R2GenConfig(image_size=image_size), config.max_words, typical)
    if name == "cmn":
        from cxpmrg_lib.models.zoo.cmn import CMNConfig, R2GenCMN

        return R2GenCMN(vocab, CMNConfig(image_size=image_size), config.max_words, typical)
    raise ValueError(f"no zoo model {name!r}")


def _pretrain_backbone(backbone: torch.nn.Module, system: System, config: BenchConfig, data: _Data,
                       run_dir: Path) -> tuple[float, str]:
    """The protocol's backbone pre-training of a system whose image network starts from scratch
    (BenchConfig.backbone_pretraining; stages.backbone): its seconds and a note for the row. Systems whose
    backbones start from the same weights share one pre-training (stages.backbone.shared_pretrain_backbone);
    each row counts its seconds, what the backbone cost whoever trained it."""
    if config.backbone_pretraining == "none":
        return 0.0, "backbone from scratch"
    from cxpmrg_lib.stages.backbone import shared_pretrain_backbone
    from cxpmrg_lib.presets import get_preset

    kind = config.backbone_pretraining
    record = shared_pretrain_backbone(bench_dir(config) / "backbones", backbone, data.train, kind,
                                      steps=config.backbone_steps, seed=config.seed,
                                      text_config=get_preset(config.preset).text, desc=system.name)
    write_json(run_dir / "backbone_pretraining.json", record)
    what = "the training findings" if kind == "labels" else "stage 2's contrastive loss"
    shared = f"; the one {record['trained_by']} trained" if record.get("reused") else ""
    return record["seconds"], f"backbone first trained on {what} ({config.backbone_steps} steps{shared})"


def _run_zoo(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    opts = dict(system.options)
    vocab, typical = _word_setup(config, data, run_dir)
    torch.manual_seed(config.seed)
    model = _zoo_model(opts["model"], vocab, config, typical, data.image_size)
    seconds, backbone_note = _pretrain_backbone(model.visual, system, config, data, run_dir)
    return _fit(model, system, config, data, run_dir, pretrain_s=seconds,
                note=f"vocabulary {len(vocab)} words; peak lr {opts.get('lr')}; {backbone_note}")


def _run_r2gengpt(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm, median_report_tokens
    from cxpmrg_lib.presets import get_preset

    lm_dir = _report_lm_dir(config, epochs=config.earlier_epochs)
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=str(lm_dir)))
    torch.manual_seed(config.seed)
    dim = get_preset(config.preset).encoder.dim
    head = VisualPrefixLM(lm, tokenizer, dim, typical_report_tokens=median_report_tokens(tokenizer, data.train.reports),
                          proj_lr_scale=_projection_scale(system, config))
    from cxpmrg_lib.models.zoo.common import ConvTokenViT
    from cxpmrg_lib.stages.backbone import TokenEncoder

    model = ReportModel(TokenEncoder(ConvTokenViT(dim), dim, data.image_size), head)
    seconds, backbone_note = _pretrain_backbone(model.encoder.backbone, system, config, data, run_dir)
    return _fit(model, system, config, data, run_dir, pretrain_s=_elapsed(lm_dir.parent) + seconds,
                note=f"conv-token ViT: {backbone_note} (R2GenGPT starts from an ImageNet Swin); the frozen LM is "
                     "MambaXray-VL's")


def _run_cvt2gpt2(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.models.zoo.cvt2gpt2 import CvT2GPT2

    lm_dir = _report_lm_dir(config, "gpt2", epochs=_lm_epochs(config))     # the LM swap's GPT-2: the warm start
    torch.manual_seed(config.seed)
    model = CvT2GPT2(lm_dir, list(data.train.reports))
    seconds, backbone_note = _pretrain_backbone(model.encoder, system, config, data, run_dir)
    return _fit(model, system, config, data, run_dir, pretrain_s=_elapsed(lm_dir.parent) + seconds,
                note=f"decoder warm-started from the GPT-2 report LM ({_lm_budget(config)}) and trained; "
                     f"encoder: {backbone_note} (the original starts from ImageNet CvT-21 and DistilGPT2)")


def _mamba_config(system: System, config: BenchConfig):
    from cxpmrg_lib.stages.report import FinetuneConfig

    return FinetuneConfig(**config.shared(), epochs=config.epochs, max_steps=config.max_steps,
                          batch_size=config.batch_size, lr=config.lr, init=dict(system.options)["init"],
                          val_studies=config.val_studies, test_studies=config.test_studies,
                          earlier_epochs=config.earlier_epochs, checkpoint_every=config.checkpoint_every,
                          projection_lr=config.projection_lr,
                          encoder_pretraining=dict(system.options).get("encoder_pretraining", "none"),
                          encoder_pretraining_steps=config.backbone_steps, pretrain_root=config.pretrain_root,
                          pretrain_kind=config.pretrain_kind, pretrain_loader=config.pretrain_loader,
                          decoding_choice=config.decoding_choice, **config.decoding())


def _run_mamba(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.stages.report import finetune_report, load_report_model

    run = finetune_report(_mamba_config(system, config))
    preds = pd.read_csv(run / "predictions_test.csv", dtype={"study_id": str}, keep_default_na=False)
    if list(preds["study_id"]) != [str(s) for s in data.test.study_ids]:
        raise RuntimeError(f"{run}: its test predictions are not of this benchmark's test studies")
    model = load_report_model(run)
    trainable, total = _count(model)
    step = json.loads((run / "encoder_pretraining.json").read_text()) if (run / "encoder_pretraining.json").exists() else {}
    return _Fitted(list(preds["prediction"]), model, _elapsed(run), trainable, total,
                   pretrain_s=_pretrain_seconds(run) + step.get("seconds", 0.0), run_dir=str(run),
                   decoding=read_summary(run).get("decoding") or config.decoding(),
                   note=f"stage-3 run {run.name}" + (f"; encoder first trained on the training findings "
                                                     f"({step['steps']} steps)" if step else ""))


class _PrefixOnFeatures(torch.nn.Module):
    """Stage 3 with the encoder frozen and its study tokens computed once: only Linear + LayerNorm
    train, in front of a frozen LM. Items are dicts with precomputed `tokens`."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, tokens, _mask, reports):
        return self.head(tokens, reports)

    @torch.no_grad()
    def generate(self, tokens, _mask=None, **decoding):
        return self.head.generate(tokens, **decoding)


class _FeatureSet(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, reports: list[str]):
        self.tokens, self.reports = tokens, reports

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        # StudyDataset's keys, so collate_studies and generate_reports take it; "image" holds the tokens
        return {"image": self.tokens[i], "image_mask": torch.ones(1, dtype=torch.bool), "report": self.reports[i],
                "labels": torch.zeros(14), "study_id": str(i)}


def _stage2_tokens(config: BenchConfig, data: _Data) -> dict:
    """Study tokens of the stage-2 encoder (frozen) for train/val/test, computed once per benchmark."""
    key = ("stage2_tokens", config.seed)        # each training seed has its own stage 2
    if key not in data.cache:
        from cxpmrg_lib.models.vision_mamba import study_tokens
        from cxpmrg_lib.stages.contrastive import load_contrastive
        from cxpmrg_lib.data.dataset import collate_studies

        encoder = load_contrastive(_stage2_run(config)).image_encoder.eval()
        out = {}
        with torch.no_grad():
            for split in ("train", "val", "test"):
                studies = getattr(data, split)
                chunks = []
                for start in range(0, len(studies), 64):
                    b = collate_studies([studies[i] for i in range(start, min(start + 64, len(studies)))])
                    chunks.append(study_tokens(encoder, b["image"], b["image_mask"]))
                out[split] = torch.cat(chunks)
        data.cache[key] = out
    return data.cache[key]


def _run_lm_swap(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm, median_report_tokens
    from cxpmrg_lib.stages.report import validation_fn

    arch = dict(system.options)["arch"]
    t_tokens = time.perf_counter()
    tokens = _stage2_tokens(config, data)
    t_tokens = time.perf_counter() - t_tokens
    lm_dir = _report_lm_dir(config, arch, epochs=_lm_epochs(config))
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=str(lm_dir)))
    torch.manual_seed(config.seed)
    head = VisualPrefixLM(lm, tokenizer, tokens["train"].shape[-1],
                          typical_report_tokens=median_report_tokens(tokenizer, data.train.reports),
                          proj_lr_scale=_projection_scale(system, config))
    model = _PrefixOnFeatures(head)
    train_set = _FeatureSet(tokens["train"], list(data.train.reports))
    val_set = _FeatureSet(tokens["val"], list(data.val.reports))
    t0 = time.perf_counter()
    _train(model, config, data, run_dir, desc=system.name, dataset=train_set,
           eval_fn=validation_fn(val_set, config.validation_decoding()))
    from cxpmrg_lib.stages.report import generate_reports

    test_set = _FeatureSet(tokens["test"], list(data.test.reports))
    decoding = _test_decoding(model, val_set, config, run_dir)
    preds = generate_reports(model.eval(), test_set, batch_size=16, **decoding)
    trainable, total = _count(model)
    return _Fitted(preds, model, _elapsed(run_dir) or time.perf_counter() - t0, trainable, total,
                   pretrain_s=_elapsed(lm_dir.parent) + t_tokens, run_dir=str(run_dir), decoding=decoding,
                   note=f"{type(lm).__name__}, LM trained {_lm_budget(config)}; frozen stage-2 encoder")


RUNNERS = {"most_common": _run_most_common, "nearest": _run_nearest, "zoo": _run_zoo, "r2gengpt": _run_r2gengpt,
            "cvt2gpt2": _run_cvt2gpt2, "mamba": _run_mamba, "lm_swap": _run_lm_swap}
