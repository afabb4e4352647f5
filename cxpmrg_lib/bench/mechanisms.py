"""Runners of the systems that each add one mechanism against generic reports (`RUNNERS`, by System.kind,
merged with runners.RUNNERS in run.py):

* kind "conditioned": PromptMRG-, M2KT-, XProNet-, TIMER- and WCL-style, the benchmark's Transformer with
  one mechanism each (models.zoo.conditioned), the same vocabulary, backbone step, budget, selection and
  decoding as the Transformer row. Those that train on more than the report get their per-study targets
  from the training split only (its labels, or clusters of its reports) through the trainer's loss
  function, keyed by study id; validation and test reports are generated without them.
* kind "context_residual": R2GenCSR-style, the LM-swap path (the frozen stage-2 encoder's study tokens, a
  Linear + LayerNorm into MambaXray-VL's frozen report LM) with context-sample residuals.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from cxpmrg_lib.bench.config import BenchConfig
from cxpmrg_lib.bench.runners import _FeatureSet, _pretrain_backbone, _stage2_tokens, _word_setup
from cxpmrg_lib.bench.systems import System
from cxpmrg_lib.bench.training import (_count, _Data, _elapsed, _fit, _Fitted, _lm_budget, _lm_epochs,
                                       _projection_scale, _report_lm_dir, _test_decoding, _train)
from cxpmrg_lib.util.fileio import write_json

log = logging.getLogger(__name__)

CONDITIONED = ("promptmrg", "timer", "m2kt", "xpronet", "wcl")


def study_labels(studies) -> np.ndarray:
    """(N, 14) label values (1, 0, -1, NaN) of a StudyDataset; a study whose source gives none (all NaN)
    gets the rule labeller's reading of its report, as the backbone step does (stages.backbone)."""
    labels = np.asarray(studies.labels, dtype=np.float32).copy()
    missing = np.isnan(labels).all(axis=1)
    if missing.any():
        from cxpmrg_lib.labels.labeler import label_reports

        ruled = label_reports([studies.reports[i] for i in np.flatnonzero(missing)]).to_numpy(dtype=np.float32)
        labels[missing] = ruled
    return labels


def _targets(name: str, opts: dict, config: BenchConfig, data: _Data, vocab, run_dir: Path):
    """(per-study training targets (N, ...) or None, the model's extra arguments, a note for the row)."""
    from cxpmrg_lib.stages.backbone import finding_targets

    if name == "promptmrg":
        from cxpmrg_lib.models.zoo.label_prompts import label_states, state_log_prior

        states = label_states(study_labels(data.train))
        return states, {"log_prior": state_log_prior(states), "tau": opts["tau"]}, \
            f"prompt states from a logit-adjusted classifier (tau {opts['tau']:g})"
    if name in ("m2kt", "xpronet"):
        extra = {"per_group": opts["per_group"]} if name == "xpronet" else {}
        return finding_targets(data.train), extra, "classifier on the training findings"
    if name == "timer":
        from cxpmrg_lib.models.zoo.unlikelihood import frequent_tokens

        penalised = frequent_tokens(vocab, data.train.reports, opts["frequent_share"])
        write_json(run_dir / "penalised_tokens.json", {"share": opts["frequent_share"],
                                                       "tokens": [vocab.itos[i] for i in penalised.tolist()]})
        return None, {"penalised": penalised, "weight": opts["weight"]}, \
            f"unlikelihood on the {len(penalised)} words of >= {opts['frequent_share']:.0%} of the training tokens"
    if name == "wcl":
        from cxpmrg_lib.models.zoo.weak_contrastive import cluster_reports

        clusters = cluster_reports(list(data.train.reports), opts["clusters"], seed=config.seed)
        write_json(run_dir / "report_clusters.json", {"clusters": opts["clusters"],
                                                      "sizes": np.bincount(clusters).tolist()})
        return torch.from_numpy(clusters), {"temperature": opts["temperature"]}, \
            f"{opts['clusters']} k-means clusters of the training reports' TF-IDF"
    raise ValueError(f"no conditioned system {name!r}; known: {CONDITIONED}")


def conditioned_model(name: str, vocab, config: BenchConfig, typical: int, image_size: int, **extra):
    """The network of a conditioned system at the benchmark's Transformer size."""
    from cxpmrg_lib.models.zoo.transformer import TransformerConfig

    args = (vocab, TransformerConfig(image_size=image_size), config.max_words, typical)
    if name == "promptmrg":
        from cxpmrg_lib.models.zoo.label_prompts import PromptMRGStyle
        return PromptMRGStyle(*args, **extra)
    if name == "timer":
        from cxpmrg_lib.models.zoo.unlikelihood import TIMERStyle
        return TIMERStyle(*args, **extra)
    if name == "m2kt":
        from cxpmrg_lib.models.zoo.label_knowledge import M2KTStyle
        return M2KTStyle(*args, **extra)
    if name == "xpronet":
        from cxpmrg_lib.models.zoo.prototypes import XProNetStyle
        return XProNetStyle(*args, **extra)
    if name == "wcl":
        from cxpmrg_lib.models.zoo.weak_contrastive import WCLStyle
        return WCLStyle(*args, **extra)
    raise ValueError(f"no conditioned system {name!r}; known: {CONDITIONED}")


def conditioned_loss(study_ids: list[str], targets: torch.Tensor | None):
    """The trainer's loss function of a conditioned system: the model's loss with its per-study `targets`
    (rows in `study_ids` order, each batch's found by study id; None: a model that needs none), and the
    parts of the loss (report cross-entropy, the mechanism's own) logged beside it."""
    row = {s: i for i, s in enumerate(study_ids)}

    def loss_fn(model, batch):
        given = None
        if targets is not None:
            try:
                idx = torch.tensor([row[s] for s in batch["study_id"]])
            except KeyError as e:
                raise KeyError(f"study {e.args[0]} of a training batch has no training target") from None
            given = targets[idx].to(batch["image"].device)
        out = model(batch["image"], batch["image_mask"], batch["report"], targets=given)
        return out["loss"], {k: float(v) for k, v in out.items() if k != "loss"}

    return loss_fn


def _run_conditioned(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    opts = dict(system.options)
    name = opts["model"]
    vocab, typical = _word_setup(config, data, run_dir)
    targets, extra, what = _targets(name, opts, config, data, vocab, run_dir)
    torch.manual_seed(config.seed)
    model = conditioned_model(name, vocab, config, typical, data.image_size, **extra)
    seconds, backbone_note = _pretrain_backbone(model.visual, system, config, data, run_dir)
    return _fit(model, system, config, data, run_dir, pretrain_s=seconds,
                loss_fn=conditioned_loss(list(data.train.study_ids), targets),
                note=f"Transformer + {what}; vocabulary {len(vocab)} words; peak lr {opts.get('lr')}; {backbone_note}")


def _run_context_residual(system: System, config: BenchConfig, data: _Data, run_dir: Path) -> _Fitted:
    from cxpmrg_lib.data.observations import CHEXPERT_LABELS
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm, median_report_tokens
    from cxpmrg_lib.models.zoo.context_residual import ContextResidualLM
    from cxpmrg_lib.stages.backbone import finding_targets
    from cxpmrg_lib.stages.report import generate_reports, validation_fn

    opts = dict(system.options)
    t_tokens = time.perf_counter()
    tokens = _stage2_tokens(config, data)
    t_tokens = time.perf_counter() - t_tokens
    lm_dir = _report_lm_dir(config, "llama", epochs=_lm_epochs(config))      # the LM of the lm-llama row
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=str(lm_dir)))
    torch.manual_seed(config.seed)
    head = VisualPrefixLM(lm, tokenizer, 3 * tokens["train"].shape[-1],      # a token and its two residuals
                          typical_report_tokens=median_report_tokens(tokenizer, data.train.reports),
                          proj_lr_scale=_projection_scale(system, config))
    normal = finding_targets(data.train)[:, CHEXPERT_LABELS.index("No Finding")] == 1
    model = ContextResidualLM(head, tokens["train"], normal, contexts=opts["contexts"])

    def loss_fn(m, batch):      # _FeatureSet's study ids are the rows of the bank: a study is not its own context
        exclude = torch.tensor([int(s) for s in batch["study_id"]], device=batch["image"].device)
        return m(batch["image"], None, batch["report"], exclude=exclude)["loss"]

    train_set = _FeatureSet(tokens["train"], list(data.train.reports))
    val_set = _FeatureSet(tokens["val"], list(data.val.reports))
    t0 = time.perf_counter()
    _train(model, config, data, run_dir, desc=system.name, dataset=train_set,
           eval_fn=validation_fn(val_set, config.validation_decoding()), loss_fn=loss_fn)
    test_set = _FeatureSet(tokens["test"], list(data.test.reports))
    decoding = _test_decoding(model, val_set, config, run_dir)
    preds = generate_reports(model.eval(), test_set, batch_size=16, **decoding)
    trainable, total = _count(model)
    return _Fitted(preds, model, _elapsed(run_dir) or time.perf_counter() - t0, trainable, total,
                   pretrain_s=_elapsed(lm_dir.parent) + t_tokens, run_dir=str(run_dir), decoding=decoding,
                   note=f"frozen stage-2 encoder and MambaXray-VL's frozen LM ({_lm_budget(config)}); residuals "
                        f"against the {opts['contexts']} most similar normal and abnormal training studies "
                        f"({int(normal.sum())} normal of {len(normal)})")


RUNNERS = {"conditioned": _run_conditioned, "context_residual": _run_context_residual}
# Kinds whose model reads the frozen stage-2 encoder's study tokens, not images (run._speed feeds it those).
TOKEN_KINDS = ("context_residual",)
