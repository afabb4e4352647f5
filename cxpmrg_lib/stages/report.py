"""Stage 3: report generation with a frozen language model, and the report LM it needs.

`pretrain_report_lm` trains the tiny preset's Llama-architecture LM on the training
reports, in the prompt format stage 3 uses (no visual tokens yet), so that the frozen LM
of stage 3 is a real language model of reports, as Llama-2 is in the paper. With a
local checkpoint (`lm_pretrained=PATH`) this stage is skipped.

`finetune_report` trains the 4-way encoder (or not: `freeze_encoder`) and the
Linear -> LayerNorm projection into the frozen LM's prompt, validates with the metric
suite during training (BLEU-4 + CE-F1 selects the best checkpoint), then writes the
test-set predictions and their metrics with bootstrap confidence intervals.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from cxpmrg_lib.data.dataset import collate_studies
from cxpmrg_lib.util.fileio import atomic_path, write_json
from cxpmrg_lib.presets import PROJECTION_LR, VALIDATIONS, get_preset
from cxpmrg_lib.stages.studies import load_studies, split_table
from cxpmrg_lib.runs import SUMMARY_FILE, is_finished
from cxpmrg_lib.stages.common import RunError, StageConfig, read_summary, require_run, resolve_device, start_run, finish_run
from cxpmrg_lib.stages.decoding import GUIDANCE_SCALES, checkpoint_decoding, generate_reports

log = logging.getLogger(__name__)

__all__ = ["ReportLMStageConfig", "pretrain_report_lm", "FinetuneConfig", "finetune_report", "finetune_runs",
           "prerequisites", "load_report_model",
           "report_examples", "generate_reports", "compare_runs", "validation_fn", "decoding_sweep", "validation_every",
           "projection_lr_scale", "INITS"]

# stage2: stages 1 + 2 (the full model); stage1: stage 1 only; random: neither;
# stage2_random: stage 2 from a random encoder (no stage 1).
INITS = ("stage2", "stage1", "random", "stage2_random")


@dataclass
class ReportLMStageConfig(StageConfig):
    """The report LM stage (see StageConfig for the shared fields). `arch`: the preset's LM size in
    another decoder architecture (the benchmark's language-model swap); "llama" is the paper's."""
    max_studies: int | None = None
    checkpoint_every: int = 200
    arch: str = "llama"
    conditioning: str = "findings"     # what the image slot holds in pre-training (report_lm.CONDITIONINGS)

    preset_defaults = "lm_stage"

    def __post_init__(self):
        super().__post_init__()
        from cxpmrg_lib.models.report_lm import CONDITIONINGS

        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, not {self.conditioning!r}")


class _Reports(Dataset):
    """Training reports, each with the phrases of the findings it states (empty without conditioning)."""

    def __init__(self, reports: list[str], phrases: list[list[str]] | None = None):
        self.reports = reports
        self.phrases = phrases if phrases is not None else [[] for _ in reports]

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, i: int) -> tuple[str, list[str]]:
        return self.reports[i], self.phrases[i]


def pretrain_report_lm(config: ReportLMStageConfig) -> Path:
    """Train the preset's fresh report LM on the training reports; returns the run directory (lm/ inside)."""
    from cxpmrg_lib.models.report_lm import VisualPrefixLM, build_report_lm, train_bpe_tokenizer
    from cxpmrg_lib.trainer import TrainConfig, train

    from dataclasses import replace

    preset = get_preset(config.preset)
    lm_config = replace(preset.report_lm, arch=config.arch)
    settings = config.train_settings()
    slot_length = preset.encoder.num_patches      # the visual tokens stage 3 puts in the slot
    payload = {**config.payload("report_lm"), "max_studies": config.max_studies,
               "lm": lm_config.to_dict(), "train": settings}
    if config.conditioning != "none":      # "none" keeps the hash (and the reuse) of runs made before the option
        payload["conditioning"] = {"kind": config.conditioning, "slot_length": slot_length}
    run_dir, finished = start_run(config, "report_lm", payload, "report LM")
    if finished:
        return run_dir
    table = split_table(config.dataset_root, "train", config.dataset_kind, config.max_studies, config.loader)
    reports = [str(r) for r in table["report"]]
    tok_dir = run_dir / "tokenizer"
    if tok_dir.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_bpe_tokenizer(reports, tok_dir)
    lm = build_report_lm(lm_config, tokenizer)
    # Trained through the stage-3 wrapper: the LM learns reports after the prompt, with the image slot
    # empty ("none") or holding the study's findings in words ("findings"), which stage 3 replaces with
    # visual tokens; the LM is then frozen, as Llama-2 is in the paper, and it has learned to read its slot.
    wrapper = VisualPrefixLM(lm, tokenizer, visual_dim=1, freeze_lm=False)
    phrases = None
    if config.conditioning == "findings":
        from cxpmrg_lib.labels.labeler import fill_labels
        from cxpmrg_lib.models.report_lm import condition_phrases

        labelled = fill_labels(table)
        phrases = [condition_phrases(row) for _, row in labelled.iterrows()]
        log.info("report LM: %d of %d training reports state a finding for the image slot",
                 sum(bool(p) for p in phrases), len(phrases))

    def loss_fn(model, batch):
        reports = [r for r, _ in batch]
        if phrases is None:
            return model(torch.zeros(len(batch), 0, 1, device=model.proj.weight.device), reports)["loss"]
        return model(None, reports, slot=model.condition_slot([p for _, p in batch], slot_length))["loss"]

    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=resolve_device(config.device),
                               **settings)
    result = train(wrapper, _Reports(reports, phrases), loss_fn, train_config, run_dir, collate_fn=list,
                   batch_size_of=len, desc=f"report LM ({config.arch})")
    lm_dir = run_dir / "lm"
    lm.cpu().save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    finish_run(run_dir, {"stage": "report_lm", "config_hash": run_dir.name, "steps": result.steps,
                                          "final_loss": result.final_loss, "train_reports": len(reports),
                                          "lm_dir": str(lm_dir), "arch": config.arch,
                                          "conditioning": config.conditioning,
                                          "parameters_m": sum(p.numel() for p in lm.parameters()) / 1e6})
    return run_dir


@dataclass
class FinetuneConfig(StageConfig):
    """Stage 3. `init`: the encoder starts from stage 2 ("stage2", the full model), from stage 1
    ("stage1"), at random ("random"), or from a stage 2 that started at random ("stage2_random"):
    the paper's ablation rows."""
    init: str = "stage2"
    freeze_encoder: bool = False
    lm_pretrained: str | None = None     # a local causal-LM folder (Llama-2, Qwen, ...); None: the preset's LM stage
    max_studies: int | None = None
    max_images: int = 2
    val_studies: int = 64                # validated during training (greedy decoding, no METEOR)
    test_studies: int | None = None      # None: the whole test split
    num_beams: int = 3
    repetition_penalty: float = 2.0
    no_repeat_ngram_size: int = 3
    earlier_epochs: float | None = None  # epochs for stages 1-2 and the LM when they must be trained (smoke runs)
    checkpoint_every: int = 200
    projection_lr: float | None = PROJECTION_LR   # peak lr of the projection into the LM; None: the model's lr
    # Not the paper's: the benchmark's backbone pre-training (stages.backbone) applied to this encoder
    # before stage 3 ("labels" | "contrastive"), for a row that holds the supervision equal; "none": the paper
    encoder_pretraining: str = "none"
    encoder_pretraining_steps: int = 300
    # The test decoding: "validation" chooses it on the validation studies from stages.decoding.CHOICE_GRID
    # by the checkpoint rule (BLEU-4 + CE-F1); "fixed": num_beams / repetition_penalty /
    # no_repeat_ngram_size above (the old setting)
    decoding_choice: str = "validation"

    preset_defaults = "stage3"

    def __post_init__(self):
        super().__post_init__()
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {self.init!r}")
        if self.encoder_pretraining not in ("none", "labels", "contrastive"):
            raise ValueError(f"encoder_pretraining must be none, labels or contrastive, not {self.encoder_pretraining!r}")
        from cxpmrg_lib.stages.decoding import DECODING_CHOICES

        if self.decoding_choice not in DECODING_CHOICES:
            raise ValueError(f"decoding_choice must be one of {DECODING_CHOICES}, not {self.decoding_choice!r}")


def _encoder_call(config: FinetuneConfig):
    """The earlier-stage run the encoder starts from, as a call (None: a random encoder)."""
    from functools import partial

    from cxpmrg_lib.stages.autoregressive import AutoregressiveConfig, pretrain_autoregressive
    from cxpmrg_lib.stages.contrastive import ContrastiveConfig, pretrain_contrastive

    common = config.earlier_shared()
    if config.init == "random":
        return None
    if config.init == "stage1":
        return partial(pretrain_autoregressive, AutoregressiveConfig(**common, epochs=config.earlier_epochs))
    return partial(pretrain_contrastive, ContrastiveConfig(
        **common, init="random" if config.init == "stage2_random" else "stage1", epochs=config.earlier_epochs,
        stage1_epochs=config.earlier_epochs))


def _lm_call(config: FinetuneConfig):
    """The report-LM run stage 3 needs, as a call (None with a local pretrained LM)."""
    from functools import partial

    if config.lm_pretrained:
        return None
    return partial(pretrain_report_lm, ReportLMStageConfig(**config.shared(), epochs=config.earlier_epochs))


def prerequisites(config: FinetuneConfig) -> list:
    """The earlier runs a stage-3 run needs (its encoder's stage, the report LM), as calls that
    train each one or find it finished; run them before training several stage-3 runs at once."""
    return [call for call in (_encoder_call(config), _lm_call(config)) if call is not None]


def _encoder_for(config: FinetuneConfig):
    from cxpmrg_lib.stages.contrastive import four_way_encoder, load_contrastive

    call = _encoder_call(config)
    run = call() if call is not None else None
    if config.init in ("random", "stage1"):
        # A random encoder's weights from the run's seed, not from whatever drew from the global generator
        # before in this process (stage 3 "w/o stages 1-2" gave 8 distinct test reports in one book and 14
        # in another when it trained in a worker beside two other runs).
        torch.manual_seed(config.seed)
        return four_way_encoder(config.preset, run), run
    return load_contrastive(run).image_encoder, run


def _lm_dir(config: FinetuneConfig) -> Path:
    if config.lm_pretrained:
        return Path(config.lm_pretrained)
    return _lm_call(config)() / "lm"


def _decoding(config: FinetuneConfig) -> dict:
    return {"num_beams": config.num_beams, "repetition_penalty": config.repetition_penalty,
            "no_repeat_ngram_size": config.no_repeat_ngram_size}


def finetune_report(config: FinetuneConfig) -> Path:
    """Stage 3; returns the run directory (generator.json, model/, best/, predictions_test.csv, summary.json)."""
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm, median_report_tokens
    from cxpmrg_lib.trainer import TrainConfig, load_weights, train

    settings = config.train_settings()
    encoder, encoder_run = _encoder_for(config)
    lm_dir = _lm_dir(config)
    payload = {**config.payload("finetune"), "init": config.init,
               "encoder_run": encoder_run.name if encoder_run else None, "lm": str(Path(lm_dir).resolve()),
               "freeze_encoder": config.freeze_encoder, "max_studies": config.max_studies,
               "max_images": config.max_images, "val_studies": config.val_studies, "train": settings,
               **config.pretraining_payload()}
    if config.projection_lr is not None:      # None keeps the hash of runs made before the option
        payload["projection_lr"] = config.projection_lr
    if config.encoder_pretraining != "none":
        payload["encoder_pretraining"] = {"kind": config.encoder_pretraining, "steps": config.encoder_pretraining_steps}
    validating = checkpoint_decoding(_decoding(config), config.decoding_choice)
    if config.decoding_choice != "fixed":     # "fixed" keeps the hash (and the reuse) of runs made before
        payload["validation_decoding"] = validating
    run_dir, finished = start_run(config, "finetune", payload, "stage 3")
    if finished:
        if read_summary(run_dir).get("test_config") != _test_config(config):
            # Same training, other test settings (test_studies, decoding): only the test predictions are redone.
            summary = read_summary(run_dir)
            summary.update(_test_predictions(load_report_model(run_dir), config, run_dir))
            write_json(run_dir / SUMMARY_FILE, summary)
            _export(run_dir)
        elif not (run_dir / "export").exists():       # a run finished before runs were exported
            _export(run_dir)
        return run_dir
    size = encoder.config.image_size
    studies, table = load_studies(config.dataset_root, size, "train", config.dataset_kind, config.max_studies,
                                  config.loader, config.max_images, on_bad_image=config.on_bad_image)
    val, _ = load_studies(config.dataset_root, size, "val", config.dataset_kind, config.val_studies,
                                  config.loader, config.max_images, on_bad_image=config.on_bad_image)
    if config.encoder_pretraining != "none":
        _pretrain_encoder(encoder, studies, config, run_dir)
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=str(lm_dir)))
    typical = median_report_tokens(tokenizer, [str(r) for r in table["report"]])
    # The projection's initialisation from the run's seed, not from whatever drew from the global
    # generator before (the same config gave other weights when earlier stages trained in this process).
    torch.manual_seed(config.seed)
    head = VisualPrefixLM(lm, tokenizer, encoder.config.dim, typical_report_tokens=typical,
                          proj_lr_scale=projection_lr_scale(config.projection_lr, settings))
    truncated = _count_truncated(head, [str(r) for r in table["report"]])
    model = ReportModel(encoder, head, freeze_encoder=config.freeze_encoder)
    generator_cfg = {"encoder": encoder.config.to_dict(), "lm_dir": str(Path(lm_dir).resolve()),
                     "typical_report_tokens": typical, "freeze_encoder": config.freeze_encoder,
                     "decoding": _decoding(config), "image_size": size, "max_images": config.max_images}
    write_json(run_dir / "generator.json", generator_cfg)

    def loss_fn(m, batch):
        return m(batch["image"], batch["image_mask"], batch["report"])["loss"]

    eval_fn = validation_fn(val, validating)

    train_config = TrainConfig(checkpoint_every=config.checkpoint_every, device=resolve_device(config.device),
                               eval_every=validation_every(settings, len(studies)), best_metric="select", **settings)
    result = train(model, studies, loss_fn, train_config, run_dir, collate_fn=collate_studies,
                   batch_size_of=lambda b: int(b["image_mask"].sum()), model_config=generator_cfg,
                   eval_fn=eval_fn, desc=f"stage 3 (report, {config.init} init)")
    best = run_dir / "best"
    model.cpu()
    if (best / "model.safetensors").exists():
        load_weights(model, best)
    summary = {"stage": "finetune", "config_hash": run_dir.name, "init": config.init, "steps": result.steps,
               "final_loss": result.final_loss, "best": result.best, "train_studies": len(studies),
               "typical_report_tokens": typical, "truncated_reports": truncated,
               "skipped_images": len(getattr(studies, "bad_images", [])) + len(getattr(val, "bad_images", []))}
    summary.update(_test_predictions(model, config, run_dir, val=val))
    finish_run(run_dir, summary)
    _export(run_dir)
    return run_dir


def _export(run_dir: Path) -> None:
    """The run's shareable folder (stages.export); a failure to write it is said, not fatal to the run."""
    from cxpmrg_lib.stages.export import export_generator

    try:
        export_generator(run_dir)
    except OSError as e:
        log.warning("%s: could not write its export/ folder (%s); export_generator(run_dir) writes it later", run_dir, e)


def _pretrain_encoder(encoder, studies, config: FinetuneConfig, run_dir: Path) -> None:
    """The benchmark's backbone pre-training on this stage's encoder (FinetuneConfig.encoder_pretraining),
    recorded in the run folder; its seconds count as the run's pre-training, not its training."""
    from cxpmrg_lib.stages.backbone import pretrain_backbone

    record = pretrain_backbone(encoder, lambda x: encoder(x).tokens, studies, config.encoder_pretraining,
                               steps=config.encoder_pretraining_steps, seed=config.seed,
                               text_config=get_preset(config.preset).text, work_dir=run_dir / "encoder_pretraining",
                               desc="stage 3 encoder")
    write_json(run_dir / "encoder_pretraining.json", record)


def validation_every(settings: dict, n_studies: int, validations: int = VALIDATIONS) -> int:
    """Optimizer steps between validations: `validations` evenly spaced ones per run, the last at the end."""
    from cxpmrg_lib.trainer import TrainConfig, total_steps_for

    return max(1, total_steps_for(TrainConfig(**settings), n_studies) // validations)


def projection_lr_scale(projection_lr: float | None, settings: dict) -> float:
    """The projection's rate as a multiple of the run's peak rate (the trainer's per-part `_lr_scale`)."""
    return 1.0 if projection_lr is None else float(projection_lr) / float(settings["lr"])


def finetune_runs(configs: dict[str, FinetuneConfig], jobs: int = 0) -> dict[str, Path]:
    """Several stage-3 runs (03_finetune's three inits): name -> run directory.

    What they share (the report LM, the earlier stages) is trained first, here; then the runs
    train side by side in `jobs` worker processes (cxpmrg_lib.util.parallel; 0: automatic)."""
    from cxpmrg_lib.util.parallel import map_parallel

    for config in configs.values():
        for call in prerequisites(config):
            call()
    device = next(iter(configs.values())).device if configs else "cpu"
    return dict(zip(configs, map_parallel(finetune_report, list(configs.values()), jobs, device,
                                          labels=[f"stage 3 {name}" for name in configs], desc="stage 3")))


def validation_fn(val, decoding: dict):
    """The checkpoint selection every trained report generator shares: greedy reports for the
    validation studies under `decoding` (stages.decoding.checkpoint_decoding: no repetition penalty
    when the test decoding is chosen on validation), scored without METEOR;
    `select` = BLEU-4 + CE-F1 (the paper's 0.8 BLEU-4 + 0.2 CIDEr rewards a generic report that
    is fluent; CE-F1 in the sum rewards reports that follow the image, which is what the
    collapse onto the normal report loses). Also recorded along training, for the diagnostics of
    the book: the share of distinct reports and, per observation, the share of reports the
    labeller reads as positive (`pos:<label>`) beside the references' share (`ref:<label>`)."""
    from cxpmrg_lib.metrics import report_scores
    from cxpmrg_lib.labels.labeler import label_reports
    from cxpmrg_lib.data.observations import CHEXPERT_LABELS

    references = list(val.reports)
    ref_rates = (label_reports(references)[CHEXPERT_LABELS] == 1.0).mean()

    def eval_fn(model):
        preds = generate_reports(model, val, batch_size=16, **{**decoding, "num_beams": 1})
        out = report_scores(references, preds)
        out["select"] = out["bleu4"] + out["ce_f1"]
        rates = (label_reports(preds)[CHEXPERT_LABELS] == 1.0).mean()
        out.update({f"pos:{c}": float(rates[c]) for c in CHEXPERT_LABELS})
        out.update({f"ref:{c}": float(ref_rates[c]) for c in CHEXPERT_LABELS})
        return out

    return eval_fn


def decoding_sweep(config: FinetuneConfig, run_dir: str | os.PathLike, grid: dict | None = None):
    """A finished stage-3 run's validation BLEU-4, CE-F1 and distinct-report share under every decoding
    setting of `grid` (decoding.SWEEP_GRID by default): how much of a collapse decoding explains."""
    from cxpmrg_lib.stages.decoding import SWEEP_GRID, decoding_sweep as sweep

    model = load_report_model(run_dir)
    val, _ = load_studies(config.dataset_root, model.image_size, "val", config.dataset_kind, config.val_studies,
                          config.loader, config.max_images, on_bad_image=config.on_bad_image)
    return sweep(model, val, grid or SWEEP_GRID)


def _count_truncated(head, reports: list[str]) -> int:
    """How many training reports are longer than the LM supervises (they are cut at max_report_tokens)."""
    from cxpmrg_lib.models.report_lm import _encode

    long = [len(_encode(head.tokenizer, r)) for r in reports]
    n = sum(t > head.max_report_tokens for t in long)
    if n:
        log.warning("%d of %d training reports are longer than %d tokens (longest %d): they are truncated, and "
                    "generation never writes past that length", n, len(reports), head.max_report_tokens, max(long))
    return n


def _test_config(config: FinetuneConfig) -> dict:
    # Chosen on validation: the choice's grid is part of it (a finished run whose test reports were
    # chosen from another grid redoes only its test predictions).
    choice = ({"decoding_choice": config.decoding_choice, "guidance": list(GUIDANCE_SCALES)}
              if config.decoding_choice != "fixed" else {})
    return {"test_studies": config.test_studies, **_decoding(config), **choice}


def _test_predictions(model, config: FinetuneConfig, run_dir: Path, val=None) -> dict:
    """Generate for the test split with the run's test decoding (config.decoding_choice: chosen on the
    validation studies, or the config's); write predictions_test.csv and its metrics, and the decoding into
    generator.json (what the exported generator uses). `val`: the validation studies when the caller has
    them loaded already (the training run's)."""
    import time

    from cxpmrg_lib.metrics.evaluate import evaluate_file
    from cxpmrg_lib.stages.decoding import decoding_for

    size = model.encoder.config.image_size
    decoding = _decoding(config)
    if config.decoding_choice != "fixed":
        if val is None:
            val, _ = load_studies(config.dataset_root, size, "val", config.dataset_kind, config.val_studies,
                                  config.loader, config.max_images, on_bad_image=config.on_bad_image)
        decoding = decoding_for(model, val, decoding, config.decoding_choice, run_dir)
    generator = run_dir / "generator.json"
    if generator.exists():
        write_json(generator, {**json.loads(generator.read_text()), "decoding": decoding})
    test, table = load_studies(config.dataset_root, size, "test", config.dataset_kind, config.test_studies,
                               config.loader, config.max_images, on_bad_image=config.on_bad_image)
    t0 = time.perf_counter()
    preds = generate_reports(model, test, batch_size=16, **decoding)
    seconds = time.perf_counter() - t0
    frame = pd.DataFrame({"study_id": table["study_id"].astype(str), "reference": table["report"],
                          "prediction": preds})
    path = run_dir / "predictions_test.csv"
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    evaluation = evaluate_file(path, n_boot=1000, seed=config.seed)
    return {"test_config": _test_config(config), "decoding": decoding, "test_studies": len(frame), "generation_s": seconds, "reports_per_s": len(frame) / max(seconds, 1e-9),
            "test_metrics": evaluation["metrics"], "test_ci": evaluation.get("ci")}


def load_report_model(run_dir: str | os.PathLike):
    """The trained ReportModel of a stage-3 run (best checkpoint when there is one), CPU, eval mode."""
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
    from cxpmrg_lib.trainer import load_weights

    run_dir = require_run(run_dir, "finetune")
    cfg = json.loads((run_dir / "generator.json").read_text())
    if not Path(cfg["lm_dir"], "config.json").exists():
        raise RunError(f"{run_dir} needs its language model at {cfg['lm_dir']}, which is not there (moved or "
                       "deleted?): restore it, or retrain stage 3")
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=cfg["lm_dir"]))
    encoder = VisionMamba(EncoderConfig(**cfg["encoder"]))
    head = VisualPrefixLM(lm, tokenizer, encoder.config.dim, typical_report_tokens=cfg["typical_report_tokens"])
    model = ReportModel(encoder, head, freeze_encoder=cfg["freeze_encoder"])
    weights = run_dir / "best" if (run_dir / "best" / "model.safetensors").exists() else run_dir / "model"
    load_weights(model, weights)
    model.decoding = cfg["decoding"]
    model.image_size, model.max_images = cfg["image_size"], cfg["max_images"]
    model.summary = read_summary(run_dir) if is_finished(run_dir) else None
    return model.eval()


def report_examples(run_dir: str | os.PathLike, dataset_root, kind: str = "auto", loader: dict | None = None,
                    n: int = 10, seed: int = 0) -> pd.DataFrame:
    """`n` seeded test studies of a stage-3 run: first image path, reference, generated report and the
    labeller's positive findings of each (what CE scores)."""
    from cxpmrg_lib.labels.labeler import label_reports
    from cxpmrg_lib.data.observations import CHEXPERT_LABELS

    preds = pd.read_csv(Path(run_dir) / "predictions_test.csv", dtype={"study_id": str}, keep_default_na=False)
    table = split_table(dataset_root, "test", kind, None, loader).astype({"study_id": str})
    merged = preds.merge(table[["study_id", "image_paths"]], on="study_id", how="left")
    pick = merged.sample(n=min(n, len(merged)), random_state=seed).reset_index(drop=True)
    pick["image_path"] = [list(p)[0] for p in pick["image_paths"]]

    def positives(texts):
        labels = label_reports(list(texts))
        return [", ".join(c for c in CHEXPERT_LABELS if row[c] == 1.0) or "-" for _, row in labels.iterrows()]

    pick["reference findings"] = positives(pick["reference"])
    pick["generated findings"] = positives(pick["prediction"])
    return pick[["study_id", "image_path", "reference", "prediction", "reference findings", "generated findings"]]


def compare_runs(runs: dict, reference: str, keys=("bleu4", "ce_f1"), n_boot: int = 1000, seed: int = 0
                 ) -> pd.DataFrame:
    """Paired bootstrap test of the `reference` run's test predictions against each other run's, on
    the same test studies: per run and metric the difference (reference - other) with its 95% CI and
    the two-sided p-value. `runs` maps names to finished stage-3 run directories."""
    from cxpmrg_lib.metrics.evaluate import evaluate_file

    ref = Path(runs[reference]) / "predictions_test.csv"
    rows = []
    for name, run in runs.items():
        if name == reference:
            continue
        result = evaluate_file(ref, against=Path(run) / "predictions_test.csv", meteor=False, n_boot=n_boot,
                               seed=seed, write=False)
        for k in keys:
            t = result["against"]["paired"][k]
            lo, hi = t["ci_delta"]
            rows.append({"against": name, "metric": k, "reference": round(t["value_a"], 4),
                         "other": round(t["value_b"], 4), "difference": round(t["delta"], 4),
                         "95% CI": f"[{lo:.3f}, {hi:.3f}]", "p": round(t["p_value"], 4)})
    return pd.DataFrame(rows)
