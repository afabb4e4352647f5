"""What every runner shares: the benchmark's studies, the shared training budget and checkpoint selection,
the test reports, and the earlier-stage runs (stage 2, the report LMs) some systems build on."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxpmrg_lib.bench.config import BenchConfig
from cxpmrg_lib.bench.systems import System
from cxpmrg_lib.runs import train_seconds, upstream_runs
from cxpmrg_lib.stages.common import resolve_device

log = logging.getLogger(__name__)


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
    decoding: dict | None = None  # the test decoding (chosen on validation or the protocol's); None: no decoding


def _elapsed(run_dir: Path) -> float:
    """Training seconds of a trainer run folder (the last elapsed_s of metrics.jsonl, resumes included)."""
    return train_seconds(run_dir, missing=0.0)


def _count(model) -> tuple[int, int]:
    from cxpmrg_lib.models.zoo.common import count_parameters

    return count_parameters(model)


def _train(model, config: BenchConfig, data: _Data, run_dir: Path, desc: str, dataset=None,
           eval_fn=None, lr: float | None = None, loss_fn=None) -> Path:
    """The shared training budget and checkpoint selection; returns the folder whose weights to load.
    `lr`: the system's own peak learning rate (an explicit config.lr overrides it). `loss_fn(model, batch)`:
    the trainer's loss function, by default the model's report loss on the batch's images and reports (a
    system that trains on more, per-study targets, passes its own)."""
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

    def report_loss(m, batch):
        return m(batch["image"], batch["image_mask"], batch["report"])["loss"]

    train(model, dataset, loss_fn or report_loss, train_config, run_dir, collate_fn=collate_studies,
          batch_size_of=lambda b: len(b["report"]), eval_fn=eval_fn or validation_fn(data.val, config.validation_decoding()),
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


def _generate(model, studies, config: BenchConfig, decoding: dict | None = None) -> list[str]:
    from cxpmrg_lib.stages.report import generate_reports

    return generate_reports(model.eval(), studies, batch_size=16, **(decoding or config.decoding()))


def _test_decoding(model, val, config: BenchConfig, run_dir: Path) -> dict:
    """The decoding a trained system writes its test reports with: chosen on its validation studies
    (config.decoding_choice "validation", the same grid and rule for every system) or the protocol's."""
    from cxpmrg_lib.stages.decoding import decoding_for

    return decoding_for(model, val, config.decoding(), config.decoding_choice, run_dir)


def _fit(model, system: System, config: BenchConfig, data: _Data, run_dir: Path, pretrain_s: float = 0.0,
         note: str = "", loss_fn=None) -> _Fitted:
    """Train a system's network under the shared budget (its own peak lr), then write the test reports."""
    t0 = time.perf_counter()
    _train(model, config, data, run_dir, desc=system.name, lr=dict(system.options).get("lr"), loss_fn=loss_fn)
    decoding = _test_decoding(model, data.val, config, run_dir)
    preds = _generate(model, data.test, config, decoding)
    trainable, total = _count(model)
    return _Fitted(preds, model, _elapsed(run_dir) or time.perf_counter() - t0, trainable, total,
                   pretrain_s=pretrain_s, run_dir=str(run_dir), note=note, decoding=decoding)


def _stage2_call(config: BenchConfig, init: str = "stage1"):
    """The stage-2 run, as a call that trains it or finds it finished (the same call, config for config,
    as stages.report.prerequisites makes for MambaXray-VL, so the earlier-stage wave runs it once)."""
    from functools import partial

    from cxpmrg_lib.stages.contrastive import ContrastiveConfig, pretrain_contrastive

    return partial(pretrain_contrastive, ContrastiveConfig(**config.earlier_shared(), init=init,
                                                           epochs=config.earlier_epochs,
                                                           stage1_epochs=config.earlier_epochs))


def _stage2_run(config: BenchConfig, init: str = "stage1") -> Path:
    return _stage2_call(config, init)()


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


def _pretrain_seconds(run_dir: Path) -> float:
    """Training seconds of the earlier stages a run was built on (stage 1, stage 2, the report LM)."""
    return sum((_elapsed(run) for run in upstream_runs(run_dir)), 0.0)
