"""The benchmark (CXPMRG-Bench here): every report generator through one protocol.

The protocol, the same for every system:

* data: the dataset's train / val / test split (the 70/10/20 patient split on CheXpert Plus
  trees; R2Gen trees keep theirs), reports as the data layer cleans them, up to two views per
  study averaged by each model;
* training budget: every trained system gets the preset's stage-3 budget (epochs, batch size,
  peak learning rate, warm-up and cosine schedule, seed) and the same checkpoint selection
  (BLEU-4 + CE-F1 of greedy reports on the first validation studies, after every epoch);
* decoding: beam size, repetition penalty and no-repeat n-gram size of stage 3, lengths 0.5x-1.5x
  the typical training report, for every system that decodes;
* scoring: the metric suite on the whole test split (NLG, CE under the R2Gen convention) with
  bootstrap CIs, and a paired bootstrap test of each system against the reference system
  (MambaXray-VL) on the same studies;
* cost: training minutes, trainable and total parameters, generation reports/s and the peak
  memory of generation, measured the same way for all.

`run_bench(BenchConfig(...))` writes `<run_root>/<dataset>/<preset>/bench/results.csv` (a row per
system, appended as each finishes; a rerun skips the finished ones) and `predictions/<system>.csv`
(study_id, reference, prediction), which `cxpmrg evaluate` reads.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cxpmrg_lib.util.fileio import atomic_path, write_json
from cxpmrg_lib.presets import PROJECTION_LR
from cxpmrg_lib.stages.common import StageConfig, config_hash, resolve_device

log = logging.getLogger(__name__)

__all__ = ["backbone_steps_table", "encoder_spread", "SYSTEMS", "DEFAULT_SYSTEMS", "SMOKE_SYSTEMS", "notebook_config", "for_dataset", "FROM_SCRATCH_LR", "System", "BenchConfig", "run_bench", "bench_dir", "read_results",
           "ranked_table", "per_label_f1", "pairwise_pvalues"]


@dataclass(frozen=True)
class System:
    slug: str            # the name on the command line and of the predictions file
    name: str            # the row label in tables
    family: str          # floor | encoder-decoder | frozen LM | MambaXray-VL | LM swap
    kind: str            # how it is run (see _RUNNERS)
    paper: str           # the original paper, cited in the book
    options: tuple = ()  # (key, value) pairs for the runner


_MAMBA = "Wang et al., CXPMRG-Bench (MambaXray-VL), CVPR 2025"
# Peak learning rate of the systems whose networks start from scratch (word-level encoder-decoders, the
# R2GenGPT-style ViT): the stage-3 rate (3e-4, for fine-tuning pre-trained parts) leaves a Transformer
# decoder far from converged in the shared budget (loss 1.94 vs 1.13 after 128 steps in a check).
FROM_SCRATCH_LR = 1e-3
SYSTEMS: dict[str, System] = {s.slug: s for s in [
    System("most-common", "Most common report", "floor", "most_common", "-"),
    System("nearest-neighbour", "Nearest neighbour (stage-2 embedding)", "floor", "nearest", "-"),
    System("transformer", "Transformer (CNN + encoder-decoder)", "encoder-decoder", "zoo",
           "Vaswani et al., NeurIPS 2017; the base model of Chen et al., EMNLP 2020",
           (("model", "transformer"), ("lr", FROM_SCRATCH_LR))),
    System("r2gen", "R2Gen", "encoder-decoder", "zoo", "Chen et al., EMNLP 2020",
           (("model", "r2gen"), ("lr", FROM_SCRATCH_LR))),
    System("r2gencmn", "R2GenCMN", "encoder-decoder", "zoo", "Chen et al., ACL 2021",
           (("model", "cmn"), ("lr", FROM_SCRATCH_LR))),
    System("cvt2gpt2", "CvT2DistilGPT2-style (conv ViT + GPT-2)", "encoder-decoder", "cvt2gpt2",
           "Nicolson et al., Artificial Intelligence in Medicine 2023"),
    System("r2gengpt", "R2GenGPT-style (conv ViT + frozen LM)", "frozen LM", "r2gengpt", "Wang et al., Meta-Radiology 2023",
           (("lr", FROM_SCRATCH_LR),)),
    System("mambaxray-vl", "MambaXray-VL", "MambaXray-VL", "mamba", _MAMBA, (("init", "stage2"),)),
    System("mambaxray-vl-no-stage1", "MambaXray-VL w/o stage 1", "MambaXray-VL", "mamba", _MAMBA,
           (("init", "stage2_random"),)),
    System("mambaxray-vl-no-stage2", "MambaXray-VL w/o stage 2", "MambaXray-VL", "mamba", _MAMBA,
           (("init", "stage1"),)),
    System("mambaxray-vl-no-pretraining", "MambaXray-VL w/o stages 1-2", "MambaXray-VL", "mamba", _MAMBA,
           (("init", "random"),)),
    # Not the paper's: MambaXray-VL whose stage-2 encoder also gets the from-scratch systems' backbone step, so
    # that the comparison with them holds the supervision equal (the architecture and stages 1-2 on top of it)
    System("mambaxray-vl-label-step", "MambaXray-VL + backbone label step", "MambaXray-VL", "mamba", _MAMBA,
           (("init", "stage2"), ("encoder_pretraining", "labels"))),
    System("lm-llama", "LM swap: Llama", "LM swap", "lm_swap", "Touvron et al., 2023 (Llama 2)", (("arch", "llama"),)),
    System("lm-qwen2", "LM swap: Qwen2", "LM swap", "lm_swap", "Yang et al., 2024 (Qwen2)", (("arch", "qwen2"),)),
    System("lm-gpt2", "LM swap: GPT-2", "LM swap", "lm_swap", "Radford et al., 2019 (GPT-2)", (("arch", "gpt2"),)),
    System("lm-phi", "LM swap: Phi", "LM swap", "lm_swap", "Li et al., 2023 (Phi-1.5)", (("arch", "phi"),)),
    System("lm-mistral", "LM swap: Mistral", "LM swap", "lm_swap", "Jiang et al., 2023 (Mistral 7B)",
           (("arch", "mistral"),)),
]}
# The default benchmark (make book). The LM swap's default pair is Llama (MambaXray-VL's LM) and GPT-2 (whose
# report LM the CvT2DistilGPT2-style system starts from, so it costs no extra LM); lm-qwen2, lm-phi and
# lm-mistral (a Llama with sliding-window attention) are there on request: about 2.5 minutes each on 2 cores,
# which the 45-minute book could not afford.
DEFAULT_SYSTEMS = ["mambaxray-vl", "most-common", "nearest-neighbour", "transformer", "r2gen", "r2gencmn",
                   "cvt2gpt2", "r2gengpt", "mambaxray-vl-no-stage1", "mambaxray-vl-no-stage2", "mambaxray-vl-no-pretraining",
                   "lm-llama", "lm-gpt2"]
REFERENCE = "mambaxray-vl"


BACKBONE_PRETRAINING = ("labels", "contrastive", "none")


@dataclass
class BenchConfig(StageConfig):
    """The benchmark's settings (StageConfig's fields: data, preset, folders, training budget overrides)."""
    systems: list[str] | None = None     # slugs, run in this order (the reference first); None: DEFAULT_SYSTEMS
    val_studies: int = 64
    test_studies: int | None = None      # None: the whole test split
    num_beams: int = 3
    repetition_penalty: float = 2.0
    no_repeat_ngram_size: int = 3
    max_words: int = 100                 # report words the word-level systems supervise (R2Gen's MIMIC setting)
    min_word_count: int = 3              # a word enters their vocabulary when seen this often in training
    lm_epochs: float = 0                 # the LM swap: epochs of each fresh LM; 0: the budget of MambaXray-VL's LM
    speed_studies: int = 32              # generation reports/s and peak memory: measured on this many test studies
    redo: list[str] = field(default_factory=list)   # systems to train and score again (their cached run is deleted)
    jobs: int = 0                        # worker processes (cxpmrg_lib.util.parallel); 0: one per core on cpu, 1 on cuda
    n_boot: int = 1000
    earlier_epochs: float | None = None  # MambaXray-VL's earlier stages when they must be trained (smoke runs)
    checkpoint_every: int = 200
    projection_lr: float | None = PROJECTION_LR   # the frozen-LM systems' projection; None: the system's lr
    # The stand-in for the ImageNet backbones the from-scratch systems' papers start from (stages.backbone):
    # "labels" trains each such backbone to predict the training reports' findings first, "contrastive" with
    # stage 2's image-report loss; "none": from scratch (the old protocol)
    backbone_pretraining: str = "labels"
    backbone_steps: int = 300

    preset_defaults = "stage3"

    def __post_init__(self):
        super().__post_init__()
        if self.backbone_pretraining not in BACKBONE_PRETRAINING:
            raise ValueError(f"backbone_pretraining must be one of {BACKBONE_PRETRAINING}, "
                             f"not {self.backbone_pretraining!r}")
        unknown = [s for s in list(self.systems or []) + list(self.redo) if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")

    def decoding(self) -> dict:
        return {"num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty,
                "no_repeat_ngram_size": self.no_repeat_ngram_size}

    def protocol(self) -> dict:
        """What makes two rows comparable: a row measured under another protocol is redone."""
        return {**self.payload("bench"), "train": self.train_settings(), "val_studies": self.val_studies,
                "test_studies": self.test_studies, "decoding": self.decoding(), "max_words": self.max_words,
                "min_word_count": self.min_word_count, "lm_epochs": self.lm_epochs, "n_boot": self.n_boot,
                "earlier_epochs": self.earlier_epochs,
                **({"projection_lr": self.projection_lr} if self.projection_lr is not None else {}),
                **({"backbone": {"pretraining": self.backbone_pretraining, "steps": self.backbone_steps}}
                   if self.backbone_pretraining != "none" else {})}


# The smoke run of the book (tests): a few systems, a few steps; 04_benchmark and 06_explore share it.
SMOKE_SYSTEMS = ["mambaxray-vl", "most-common", "transformer", "r2gen", "lm-gpt2"]
SMOKE_BUDGET = dict(epochs=1, val_studies=8, test_studies=16, earlier_epochs=1, n_boot=100, speed_studies=4,
                    lm_epochs=1, backbone_steps=4)


def _slugs(systems: str | list | None) -> list[str]:
    return [s.strip() for s in systems.split(",") if s.strip()] if isinstance(systems, str) else list(systems or [])


def notebook_config(dataset_root: str, dataset_kind: str = "auto", loader: dict | None = None, preset: str = "tiny",
                    run_root: str = "runs", seed: int = 0, device: str = "cpu", systems: str | list | None = "",
                    epochs: float = 0, lm_epochs: float = 0, smoke: bool = False, jobs: int = 0,
                    backbone_pretraining: str = "labels") -> BenchConfig:
    """The benchmark of the notebooks' parameters (04_benchmark runs it, 06_explore reads the same folder).
    `systems`: comma-separated slugs or a list; empty: the default list (the smoke list in a smoke run)."""
    chosen = _slugs(systems)
    if smoke and not chosen:
        chosen = list(SMOKE_SYSTEMS)
    budget = {"lm_epochs": lm_epochs, **({"epochs": epochs} if epochs else {}), **(SMOKE_BUDGET if smoke else {})}
    return BenchConfig(dataset_root=dataset_root, dataset_kind=dataset_kind, preset=preset, run_root=run_root,
                       seed=seed, device=device, loader=loader or {}, systems=chosen or None, jobs=jobs,
                       backbone_pretraining=backbone_pretraining, **budget)


# The smoke run's systems on a second dataset (the iu-phantom of 04_benchmark).
SMOKE_SECOND_SYSTEMS = ["most-common", "r2gen"]


def for_dataset(config: BenchConfig, dataset_root: str, dataset_kind: str = "auto", systems: str | list | None = "",
                smoke: bool = False, jobs: int = 1) -> BenchConfig:
    """The same protocol and budget on another dataset (04_benchmark's iu-phantom), with its own
    systems (empty: the default list; in a smoke run SMOKE_SECOND_SYSTEMS).

    `jobs` is 1 by default: on a new dataset most of the work is MambaXray-VL's chain of stages
    (1, then 2, then 3), which waits for itself; in a worker with half the cores it ran about twice
    as slowly (iu-phantom: 9 minutes against 5 in one process)."""
    from dataclasses import replace

    chosen = list(SMOKE_SECOND_SYSTEMS) if smoke else _slugs(systems)
    loader = {} if dataset_kind == "r2gen" else config.loader
    return replace(config, dataset_root=dataset_root, dataset_kind=dataset_kind, loader=loader,
                   systems=chosen or None, redo=[], jobs=jobs)


def bench_dir(config: BenchConfig) -> Path:
    return Path(config.run_root) / (Path(config.dataset_root).resolve().name or "dataset") / config.preset / "bench"


def read_results(path: str | Path) -> pd.DataFrame:
    """results.csv of a benchmark folder (or the file itself)."""
    path = Path(path)
    table = pd.read_csv(path / "results.csv" if path.is_dir() else path)
    if "threads" not in table:            # rows written before the benchmark ran in workers
        table["threads"] = np.nan
    return table


# ----------------------------------------------------------------------------- data shared by the runners

@dataclass
class _Data:
    train: object
    val: object
    test: object
    test_table: pd.DataFrame
    image_size: int
    cache: dict = field(default_factory=dict)


def _load_data(config: BenchConfig) -> _Data:
    from cxpmrg_lib.presets import get_preset
    from cxpmrg_lib.stages.studies import load_studies

    size = get_preset(config.preset).encoder.image_size
    common = dict(kind=config.dataset_kind, loader=config.loader, on_bad_image=config.on_bad_image)
    train, _ = load_studies(config.dataset_root, size, "train", **common)
    val, _ = load_studies(config.dataset_root, size, "val", limit=config.val_studies, **common)
    test, table = load_studies(config.dataset_root, size, "test", limit=config.test_studies, **common)
    return _Data(train, val, test, table, size)


@dataclass
class _Fitted:
    predictions: list[str]
    model: object | None          # something with .generate(images, mask, **decoding), for the speed check
    train_s: float
    trainable: int
    total: int
    pretrain_s: float = 0.0
    run_dir: str | None = None
    note: str = ""


def _elapsed(run_dir: Path) -> float:
    """Training seconds of a trainer run folder (the last elapsed_s of metrics.jsonl, resumes included)."""
    path = Path(run_dir) / "metrics.jsonl"
    last = 0.0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(last, float(json.loads(line).get("elapsed_s", 0.0)))
            except (ValueError, AttributeError):
                continue
    return last


def _count(model) -> tuple[int, int]:
    from cxpmrg_lib.models.zoo.common import count_parameters

    return count_parameters(model)


def _train(model, config: BenchConfig, data: _Data, run_dir: Path, desc: str, dataset=None,
           eval_fn=None, lr: float | None = None) -> Path:
    """The shared training budget and checkpoint selection; returns the folder whose weights to load.
    `lr`: the system's own peak learning rate (an explicit config.lr overrides it)."""
    from cxpmrg_lib.data.dataset import collate_studies
    from cxpmrg_lib.stages.report import validation_fn
    from cxpmrg_lib.trainer import TrainConfig, load_weights, train

    settings = config.train_settings()
    if lr is not None and config.lr is None:
        settings["lr"] = lr
    dataset = dataset if dataset is not None else data.train
    from cxpmrg_lib.stages.report import validation_every

    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=resolve_device(config.device),
                               eval_every=validation_every(settings, len(dataset)), best_metric="select", **settings)

    def loss_fn(m, batch):
        return m(batch["image"], batch["image_mask"], batch["report"])["loss"]

    train(model, dataset, loss_fn, train_config, run_dir, collate_fn=collate_studies,
          batch_size_of=lambda b: len(b["report"]), eval_fn=eval_fn or validation_fn(data.val, config.decoding()),
          desc=desc)
    model.cpu()
    best = run_dir / "best"
    if (best / "model.safetensors").exists():
        load_weights(model, best)
    return best


def _peak_lr(system: System, config: BenchConfig) -> float:
    """The peak learning rate a system trains at: an explicit config.lr, else its own, else the preset's."""
    if config.lr is not None:
        return config.lr
    return dict(system.options).get("lr") or config.train_settings()["lr"]


def _projection_scale(system: System, config: BenchConfig) -> float:
    from cxpmrg_lib.stages.report import projection_lr_scale

    return projection_lr_scale(config.projection_lr, {"lr": _peak_lr(system, config)})


def _generate(model, studies, config: BenchConfig) -> list[str]:
    from cxpmrg_lib.stages.report import generate_reports

    return generate_reports(model.eval(), studies, batch_size=16, **config.decoding())


# ----------------------------------------------------------------------------- the runners

def _fit(model, system: System, config: BenchConfig, data: _Data, run_dir: Path, pretrain_s: float = 0.0,
         note: str = "") -> _Fitted:
    """Train a system's network under the shared budget (its own peak lr), then write the test reports."""
    t0 = time.perf_counter()
    _train(model, config, data, run_dir, desc=system.name, lr=dict(system.options).get("lr"))
    preds = _generate(model, data.test, config)
    trainable, total = _count(model)
    return _Fitted(preds, model, _elapsed(run_dir) or time.perf_counter() - t0, trainable, total,
                   pretrain_s=pretrain_s, run_dir=str(run_dir), note=note)


def _run_most_common(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    counts = pd.Series(list(data.train.reports)).value_counts()
    best = counts.index[0]
    return _Fitted([best] * len(data.test), None, 0.0, 0, 0,
                   note=f"{counts.iloc[0]} of {len(data.train)} training reports are this one")


def _stage2_call(config: BenchConfig, init: str = "stage1"):
    """The stage-2 run, as a call that trains it or finds it finished (the same call, config for config,
    as stages.report.prerequisites makes for MambaXray-VL, so the earlier-stage wave runs it once)."""
    from functools import partial

    from cxpmrg_lib.stages.contrastive import ContrastiveConfig, pretrain_contrastive

    return partial(pretrain_contrastive, ContrastiveConfig(**config.shared(), init=init, epochs=config.earlier_epochs,
                                                           stage1_epochs=config.earlier_epochs))


def _stage2_run(config: BenchConfig, init: str = "stage1") -> Path:
    return _stage2_call(config, init)()


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
    (BenchConfig.backbone_pretraining; stages.backbone): its seconds and a note for the row."""
    if config.backbone_pretraining == "none":
        return 0.0, "backbone from scratch"
    from cxpmrg_lib.stages.backbone import pretrain_backbone
    from cxpmrg_lib.presets import get_preset

    kind = config.backbone_pretraining
    record = pretrain_backbone(backbone, backbone, data.train, kind, steps=config.backbone_steps, seed=config.seed,
                               text_config=get_preset(config.preset).text, work_dir=run_dir / "backbone_pretraining",
                               desc=system.name)
    write_json(run_dir / "backbone_pretraining.json", record)
    what = "the training findings" if kind == "labels" else "stage 2's contrastive loss"
    return record["seconds"], f"backbone first trained on {what} ({config.backbone_steps} steps)"




def _run_zoo(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    opts = dict(system.options)
    vocab, typical = _word_setup(config, data, run_dir)
    torch.manual_seed(config.seed)
    model = _zoo_model(opts["model"], vocab, config, typical, data.image_size)
    seconds, backbone_note = _pretrain_backbone(model.visual, system, config, data, run_dir)
    return _fit(model, system, config, data, run_dir, pretrain_s=seconds,
                note=f"vocabulary {len(vocab)} words; peak lr {opts.get('lr')}; {backbone_note}")


def encoder_spread(config: BenchConfig, slugs=("transformer", "r2gen", "r2gencmn")) -> pd.DataFrame:
    """Do the word-level systems' encoders give different studies different features? Per system, the
    between-study spread and mean cosine of its pooled image memory on the validation studies, trained
    (the row's kept weights) and at its initialisation: a collapse with features that do differ is the
    decoder ignoring them, not an encoder (or mask) bug that hands it one input for every image."""
    from cxpmrg_lib.chapters.diagnostics import feature_spread
    from cxpmrg_lib.models.zoo.common import WordVocab
    from cxpmrg_lib.trainer import load_weights

    results = read_results(bench_dir(config) / "results.csv")
    data = _data_for(config)
    rows = []
    for slug in slugs:
        row = results[results["system"] == slug]
        if row.empty or SYSTEMS[slug].kind != "zoo":
            continue
        run_dir = Path(row.iloc[0]["run_dir"])
        vocab = WordVocab.load(run_dir / "vocab.json")
        torch.manual_seed(config.seed)
        model = _zoo_model(dict(SYSTEMS[slug].options)["model"], vocab, config, 1, data.image_size).eval()
        initial = feature_spread(model.encode, data.val)
        load_weights(model, run_dir / "best" if (run_dir / "best" / "model.safetensors").exists() else run_dir)
        trained = feature_spread(model.encode, data.val)
        rows.append({"system": SYSTEMS[slug].name, "studies": trained["studies"],
                     "spread (trained)": trained["between_study_spread"],
                     "cosine (trained)": trained["mean_cosine_between_studies"],
                     "spread (init)": initial["between_study_spread"],
                     "cosine (init)": initial["mean_cosine_between_studies"]})
    return pd.DataFrame(rows).set_index("system") if rows else pd.DataFrame()


def _report_lm_call(config: BenchConfig, arch: str = "llama", epochs: float | None = None):
    """The report-LM run of an architecture, as a call (for llama at the earlier epochs, the same call as
    stages.report.prerequisites makes for MambaXray-VL)."""
    from functools import partial

    from cxpmrg_lib.stages.report import ReportLMStageConfig, pretrain_report_lm

    return partial(pretrain_report_lm, ReportLMStageConfig(**config.shared(), epochs=epochs, arch=arch))


def _lm_epochs(config: BenchConfig) -> float | None:
    """Epochs of the LM swap's report LMs (and the CvT2DistilGPT2-style warm start): lm_epochs, or when 0 the
    budget of MambaXray-VL's own LM, so that the swapped LMs are trained as long as the one they replace
    (2 epochs, the old default, left them unable to read the image slot: every swap row at the floor)."""
    return config.lm_epochs or config.earlier_epochs


def _lm_budget(config: BenchConfig) -> str:
    epochs = _lm_epochs(config)
    return f"{epochs:g} epochs" if epochs else "as long as MambaXray-VL's LM"


def _report_lm_dir(config: BenchConfig, arch: str = "llama", epochs: float | None = None) -> Path:
    return _report_lm_call(config, arch, epochs)() / "lm"


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


def _pretrain_seconds(run_dir: Path) -> float:
    """Training seconds of the earlier stages a run was built on (stage 1, stage 2, the report LM)."""
    from cxpmrg_lib.stages.common import read_summary

    total, seen, todo = 0.0, set(), [Path(run_dir)]
    while todo:
        run = todo.pop()
        if run in seen or not (run / "config.yaml").exists():
            continue
        seen.add(run)
        if run != Path(run_dir):
            total += _elapsed(run)
        resolved = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("resolved", {})
        summary = read_summary(run) if (run / "summary.json").exists() else {}
        lm = resolved.get("lm")                 # stage 3: the LM folder; the LM stage itself: its config
        for ref in (summary.get("stage1_run"), str(Path(lm).parent) if isinstance(lm, str) else None):
            if ref:
                todo.append(Path(ref))
        if resolved.get("encoder_run"):
            stage = "contrastive" if resolved.get("init", "").startswith("stage2") else "autoregressive"
            todo.append(run.parents[1] / stage / resolved["encoder_run"])
    return total


def _mamba_config(system: System, config: BenchConfig):
    from cxpmrg_lib.stages.report import FinetuneConfig

    return FinetuneConfig(**config.shared(), epochs=config.epochs, max_steps=config.max_steps,
                          batch_size=config.batch_size, lr=config.lr, init=dict(system.options)["init"],
                          val_studies=config.val_studies, test_studies=config.test_studies,
                          earlier_epochs=config.earlier_epochs, checkpoint_every=config.checkpoint_every,
                          projection_lr=config.projection_lr,
                          encoder_pretraining=dict(system.options).get("encoder_pretraining", "none"),
                          encoder_pretraining_steps=config.backbone_steps, **config.decoding())


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
    if "stage2_tokens" not in data.cache:
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
        data.cache["stage2_tokens"] = out
    return data.cache["stage2_tokens"]


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
           eval_fn=validation_fn(val_set, config.decoding()))
    from cxpmrg_lib.stages.report import generate_reports

    test_set = _FeatureSet(tokens["test"], list(data.test.reports))
    preds = generate_reports(model.eval(), test_set, batch_size=16, **config.decoding())
    trainable, total = _count(model)
    return _Fitted(preds, model, _elapsed(run_dir) or time.perf_counter() - t0, trainable, total,
                   pretrain_s=_elapsed(lm_dir.parent) + t_tokens, run_dir=str(run_dir),
                   note=f"{type(lm).__name__}, LM trained {_lm_budget(config)}; frozen stage-2 encoder")


_RUNNERS = {"most_common": _run_most_common, "nearest": _run_nearest, "zoo": _run_zoo, "r2gengpt": _run_r2gengpt,
            "cvt2gpt2": _run_cvt2gpt2, "mamba": _run_mamba, "lm_swap": _run_lm_swap}


# ----------------------------------------------------------------------------- speed, scoring, the table

def _speed(fitted: _Fitted, system: System, config: BenchConfig, data: _Data) -> dict:
    """Generation reports/s and peak extra memory on the first `speed_studies` test studies."""
    from cxpmrg_lib.perf.report import PeakMemory

    n = min(config.speed_studies, len(data.test))
    if fitted.model is None:                # a constant report: nothing to run
        return {"reports_per_s": math.nan, "peak_mib": 0.0}
    if system.kind == "lm_swap":
        studies = _FeatureSet(_stage2_tokens(config, data)["test"][:n], list(data.test.reports[:n]))
    else:
        studies = torch.utils.data.Subset(data.test, range(n))
    from cxpmrg_lib.stages.report import generate_reports

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        generate_reports(fitted.model.eval(), studies, batch_size=16, **config.decoding())
        seconds = time.perf_counter() - t0
    return {"reports_per_s": n / seconds, "peak_mib": mem.extra_mib}


def _score(pred_path: Path, reference_path: Path | None, config: BenchConfig) -> dict:
    from cxpmrg_lib.metrics.evaluate import evaluate_file

    against = reference_path if reference_path is not None and reference_path != pred_path else None
    result = evaluate_file(pred_path, against=against, n_boot=config.n_boot, seed=config.seed)
    row = {}
    for k, v in result["metrics"].items():
        lo, hi = (result.get("ci") or {}).get(k) or (math.nan, math.nan)
        row.update({k: v, f"{k}_lo": lo, f"{k}_hi": hi})
    if result.get("against"):
        for k, t in result["against"]["paired"].items():
            row[f"p_{k}"] = t["p_value"]
    return row


def _row_hash(protocol: dict, system: System) -> str:
    """A row is redone when the shared protocol or the system's own settings change."""
    return config_hash({**protocol, "system": system.slug, "options": dict(system.options)})


def _append_row(path: Path, row: dict) -> pd.DataFrame:
    table = pd.read_csv(path) if path.exists() else pd.DataFrame()
    if not table.empty:
        table = table[table["system"] != row["system"]]
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    order = {slug: i for i, slug in enumerate(SYSTEMS)} | {REFERENCE: -1}   # a redone row keeps its place
    table = table.sort_values("system", key=lambda col: col.map(order).fillna(len(order)), kind="stable")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


# Submission order of the rows: MambaXray-VL first (every row is tested against it), then the longest
# trainings, so that with several workers no long job starts last while the others stand idle.
_ORDER = {"mamba": 0, "zoo": 1, "cvt2gpt2": 1, "r2gengpt": 1, "lm_swap": 2, "nearest": 3, "most_common": 3}
_DATA: dict[str, _Data] = {}


def _data_for(config: BenchConfig) -> _Data:
    """The benchmark's studies, decoded once per process (a worker keeps them for its next rows)."""
    key = config_hash(config.protocol())
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = _load_data(config)
    return _DATA[key]


def _fit_row(config: BenchConfig, slug: str) -> dict:
    """Train (or reuse) one system and write its test predictions; its row without the scores.
    A job of its own: run_bench may run several in worker processes."""
    data = _data_for(config)
    out, system, protocol = bench_dir(config), SYSTEMS[slug], config.protocol()
    run_dir = out / slug / _row_hash(protocol, system)
    if slug in config.redo and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("benchmark: %s", system.name)
    t0 = time.perf_counter()
    fitted = _RUNNERS[system.kind](system, config, data, run_dir)
    frame = pd.DataFrame({"study_id": [str(s) for s in data.test.study_ids],
                          "reference": list(data.test.reports), "prediction": fitted.predictions})
    with atomic_path(out / "predictions" / f"{slug}.csv") as tmp:
        frame.to_csv(tmp, index=False)
    row = {"system": slug, "name": system.name, "family": system.family, "paper": system.paper,
           "protocol": _row_hash(protocol, system), "n_test": len(frame)}
    measured = _speed(fitted, system, config, data)
    measured.update({"train_min": fitted.train_s / 60, "pretrain_min": fitted.pretrain_s / 60,
                     "trainable_m": fitted.trainable / 1e6, "total_m": fitted.total / 1e6,
                     "wall_min": (time.perf_counter() - t0) / 60, "threads": torch.get_num_threads(),
                     "run_dir": fitted.run_dir, "note": fitted.note})
    return {"row": row, "measured": measured}


def _earlier_runs(config: BenchConfig, slugs: list[str]) -> tuple[list, list[str]]:
    """The earlier-stage runs (stages 1-2, report LMs) the systems need, each once, as calls and labels:
    trained as a first wave, so that no row waits for another row to train what both need."""
    from cxpmrg_lib.stages.report import prerequisites

    calls: dict[str, tuple] = {}

    def add(call, label: str) -> None:        # one entry per run: the stage function and its config
        calls.setdefault(f"{call.func.__qualname__}{call.args!r}", (call, label))

    for slug in slugs:
        kind, options = SYSTEMS[slug].kind, dict(SYSTEMS[slug].options)
        if kind == "mamba":
            for call in prerequisites(_mamba_config(SYSTEMS[slug], config)):
                add(call, f"{call.func.__name__} for {SYSTEMS[slug].name}")
        if kind in ("nearest", "lm_swap"):
            add(_stage2_call(config), "stage 2")
        if kind == "r2gengpt":
            add(_report_lm_call(config, epochs=config.earlier_epochs), "report LM (llama)")
        if kind in ("lm_swap", "cvt2gpt2"):
            arch = options.get("arch", "gpt2")
            add(_report_lm_call(config, arch, epochs=_lm_epochs(config)), f"report LM ({arch})")
    return [c for c, _ in calls.values()], [label for _, label in calls.values()]


def run_bench(config: BenchConfig) -> Path:
    """Run every asked-for system not yet in results.csv under this protocol; returns the bench folder.

    Systems train side by side in `config.jobs` worker processes (see cxpmrg_lib.util.parallel); each
    row is scored here and appended to results.csv as soon as it and the reference are done."""
    from functools import partial

    from cxpmrg_lib.util.parallel import Workers, call

    slugs = list(config.systems or DEFAULT_SYSTEMS)
    out = bench_dir(config)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    protocol = config.protocol()
    phash = config_hash(protocol)
    write_json(out / f"protocol_{phash}.json", protocol)
    results = out / "results.csv"
    done = read_results(results) if results.exists() else pd.DataFrame(columns=["system", "protocol"])
    have = dict(zip(done["system"], done["protocol"])) if "protocol" in done else {}
    todo = [s for s in slugs if have.get(s) != _row_hash(protocol, SYSTEMS[s]) or s in config.redo]
    if not todo:
        log.info("benchmark: all %d systems already in %s", len(slugs), results)
        return out
    todo.sort(key=lambda s: (s != REFERENCE, _ORDER.get(SYSTEMS[s].kind, 1)))
    ref_path = out / "predictions" / f"{REFERENCE}.csv"
    waiting: list[dict] = []        # rows done before the reference they are tested against
    reference_pending = REFERENCE in todo

    def finish(job: dict) -> None:
        pred_path = out / "predictions" / f"{job['row']['system']}.csv"
        row = {**job["row"], **_score(pred_path, ref_path if ref_path.exists() else None, config),
               **job["measured"]}
        _append_row(results, row)
        log.info("benchmark: %s done: BLEU-4 %.3f, CE-F1 %.3f", row["name"], row["bleu4"], row["ce_f1"])

    try:
        with Workers(config.jobs, config.device, tasks=len(todo)) as workers:
            calls, labels = _earlier_runs(config, todo)
            for _ in workers.run(call, calls, labels, desc="earlier stages"):
                pass
            for _, job in workers.run(partial(_fit_row, config), todo, [SYSTEMS[s].name for s in todo],
                                      desc="benchmark"):
                if reference_pending and job["row"]["system"] != REFERENCE:
                    waiting.append(job)
                    continue
                reference_pending = False
                for ready in [job] + waiting:
                    finish(ready)
                waiting.clear()
    finally:
        _DATA.clear()
    return out


def ranked_table(results: pd.DataFrame, keys=("bleu4", "rouge_l", "meteor", "cider", "ce_precision", "ce_recall",
                                             "ce_f1"), ci: bool = True) -> pd.DataFrame:
    """value [lo, hi] per system and metric, best in bold and second-best underlined (as the paper marks
    them) with HTML tags: show it with `to_html(escape=False)`."""
    table = results.set_index("name")
    out = pd.DataFrame(index=table.index)
    for k in keys:
        values = table[k].astype(float)
        order = values.rank(ascending=False, method="min")
        cells = []
        for name, v in values.items():
            text = f"{v:.3f}"
            if ci and f"{k}_lo" in table and not math.isnan(float(table.loc[name, f"{k}_lo"])):
                text += f" [{table.loc[name, f'{k}_lo']:.3f}, {table.loc[name, f'{k}_hi']:.3f}]"
            if order[name] == 1:
                text = f"<b>{text}</b>"
            elif order[name] == 2:
                text = f"<u>{text}</u>"
            cells.append(text)
        out[k] = cells
    return out


# ----------------------------------------------------------------------------- analysis for the book

def per_label_f1(out_dir: str | Path, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Systems x 14 observations: the CE F1 of each label (from predictions/<system>.metrics.json)."""
    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    rows = {}
    for slug, name in zip(results["system"], results["name"]):
        path = out_dir / "predictions" / f"{slug}.metrics.json"
        if path.exists():
            per = json.loads(path.read_text()).get("per_label") or []
            rows[name] = {r["label"]: r["f1"] for r in per}
    return pd.DataFrame.from_dict(rows, orient="index")


def pairwise_pvalues(out_dir: str | Path, metric: str = "ce_f1", n_boot: int = 1000, seed: int = 0,
                     results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Two-sided paired bootstrap p-values of `metric` between every pair of systems (same test studies)."""
    from cxpmrg_lib.metrics.evaluate import read_predictions
    from cxpmrg_lib.metrics import compare_stats, study_stats

    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    stats, ref_labels, names = {}, None, []
    for slug, name in zip(results["system"], results["name"]):
        frame = read_predictions(out_dir / "predictions" / f"{slug}.csv")
        st = study_stats(frame["reference"].tolist(), frame["prediction"].tolist(), meteor=False, metrics=[metric],
                         ref_labels=ref_labels)
        ref_labels = st.ref_labels if ref_labels is None else ref_labels
        stats[name] = st
        names.append(name)
    table = pd.DataFrame(np.nan, index=names, columns=names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = compare_stats(stats[a], stats[b], [metric], n_boot, "bootstrap", seed)[metric]["p_value"]
            table.loc[a, b] = table.loc[b, a] = p
    return table


def backbone_steps_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per row whose image network took the backbone step (from its run folder): the objective, steps,
    seconds and the loss at the first and the last step. For the label objective also the loss of
    predicting each label's training rate whatever the image (the prior): a last loss near it means the
    network learned little of the findings in its steps."""
    rows = {}
    for name, run_dir in zip(results["name"], results["run_dir"]):
        if not isinstance(run_dir, str) or not run_dir:
            continue
        for file in ("backbone_pretraining.json", "encoder_pretraining.json"):
            path = Path(run_dir) / file
            if path.exists():
                r = json.loads(path.read_text())
                rates = np.clip(np.asarray(r.get("positive_rate") or [np.nan], dtype=float), 1e-6, 1 - 1e-6)
                prior = float(np.mean(-(rates * np.log(rates) + (1 - rates) * np.log(1 - rates))))
                rows[name] = {"objective": r["objective"], "steps": r["steps"], "seconds": r["seconds"],
                              "first loss": r["first_loss"], "last loss": r["last_loss"],
                              "prior loss": prior if r["objective"] == "labels" else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


def report_diversity(out_dir: str | Path, results: pd.DataFrame | None = None,
                     finding_sets: bool = False) -> pd.DataFrame:
    """Per system: distinct test reports and the share of the most frequent one. A system that writes a
    handful of reports for hundreds of studies has collapsed onto the report prior, whatever its BLEU.

    `finding_sets=True` adds a first row for the references and a column "distinct finding sets": how
    many different sets of positive observations the rule labeller reads in a system's reports. A
    system that decodes deterministically writes about one wording per finding set, and the phantom's
    wording is drawn at random apart from the findings, so the references' count of finding sets
    bounds how many distinct reports even a system that gets every finding right would write."""
    from cxpmrg_lib.metrics.evaluate import read_predictions

    out_dir = Path(out_dir)
    results = read_results(out_dir) if results is None else results
    rows = {}

    def add(name: str, reports: pd.Series) -> None:
        counts = reports.value_counts()
        rows[name] = {"distinct reports": int(len(counts)), "test studies": int(len(reports)),
                      "most frequent share": float(counts.iloc[0] / len(reports)) if len(reports) else math.nan}
        if finding_sets:
            rows[name]["distinct finding sets"] = _finding_sets(list(reports))

    for slug, name in zip(results["system"], results["name"]):
        preds = read_predictions(out_dir / "predictions" / f"{slug}.csv")
        if finding_sets and not rows:
            add("References", preds["reference"])
        add(name, preds["prediction"])
    return pd.DataFrame.from_dict(rows, orient="index")


def _finding_sets(reports: list[str]) -> int:
    from cxpmrg_lib.labels.labeler import label_reports

    labels = label_reports(reports)
    return int(len({tuple(labels.columns[row == 1]) for row in labels.to_numpy()}))


def plain_summary(results: pd.DataFrame, pvalues: pd.DataFrame, diversity: pd.DataFrame,
                  metric: str = "ce_f1", floor: str = "Most common report", alpha: float = 0.05) -> str:
    """What this run shows, in sentences computed from its own numbers (markdown): which systems beat the
    most-common floor on `metric` by a paired test, which collapsed onto a few reports, and the best row."""
    label = {"ce_f1": "CE-F1", "bleu4": "BLEU-4"}.get(metric, metric)
    table = results.set_index("name")
    lines = []
    best = table[metric].astype(float).idxmax()
    lines.append(f"- Best {label}: **{best}** ({table.loc[best, metric]:.3f}).")
    if floor in table.index and floor in pvalues.index:
        base = float(table.loc[floor, metric])
        above = [n for n in table.index if n != floor and float(table.loc[n, metric]) > base
                 and float(pvalues.loc[n, floor]) < alpha]
        same = [n for n in table.index if n != floor and n not in above]
        lines.append(f"- {len(above)} of {len(table) - 1} systems beat the most common training report on {label} "
                     f"({base:.3f}) by a paired test at p < {alpha}: {', '.join(above) or 'none'}.")
        if same:
            lines.append(f"- Not distinguishable from it, or below it: {', '.join(same)}.")
    collapsed = diversity[(diversity["distinct reports"] <= 10) & (diversity.index != floor)
                          & (diversity.index != "References")]
    if len(collapsed):
        lines.append(f"- {len(collapsed)} systems wrote at most 10 distinct reports for "
                     f"{int(diversity['test studies'].max())} test studies (they fell back on the most likely "
                     f"report whatever the image): " + ", ".join(f"{n} ({int(r['distinct reports'])})"
                                                            for n, r in collapsed.iterrows()) + ".")
    if "References" in diversity.index and "distinct finding sets" in diversity.columns:
        ref = diversity.loc["References"]
        systems = diversity.drop(index=["References", floor], errors="ignore")
        best = systems["distinct finding sets"].idxmax() if len(systems) else None
        lines.append(f"- The {int(ref['test studies'])} references state {int(ref['distinct finding sets'])} distinct "
                     f"sets of findings ({ref['distinct finding sets'] / ref['test studies']:.0%} of the studies): a "
                     "system that decodes deterministically writes about one wording per set, so that share bounds "
                     "its distinct reports even when every finding is right."
                     + (f" The most sets a system wrote: {best} ({int(systems.loc[best, 'distinct finding sets'])})."
                        if best is not None else ""))
    return "\n".join(lines)
