"""The training stages of MambaXray-VL, each a function of a config that returns its run directory.

A stage's run directory is `<run_root>/<dataset>/<preset>/<stage>/<config hash>/`. A
finished run (its `summary.json` exists) is reused as is; an interrupted one resumes
from its last checkpoint (the trainer does that); nothing is re-run for the same config.
Later stages call earlier ones, so any stage runs alone on a fresh checkout.
"""
from cxpmrg_lib.stages.autoregressive import (AutoregressiveConfig, autoregressive_examples, load_autoregressive,
                                              pretrain_autoregressive)
from cxpmrg_lib.stages.common import RunError, config_hash, read_summary, require_run, resolve_device, run_dir_for
from cxpmrg_lib.stages.contrastive import (ContrastiveConfig, contrastive_embeddings, contrastive_retrieval,
                                           contrastive_runs,
                                           four_way_encoder, load_contrastive, pretrain_contrastive)
from cxpmrg_lib.stages.report import (FinetuneConfig, ReportLMStageConfig, finetune_report, finetune_runs,
                                     load_report_model,
                                     pretrain_report_lm, report_examples)

__all__ = ["FinetuneConfig", "ReportLMStageConfig", "finetune_report", "finetune_runs", "contrastive_runs", "load_report_model", "pretrain_report_lm",
           "report_examples", "AutoregressiveConfig", "autoregressive_examples", "load_autoregressive", "pretrain_autoregressive",
           "RunError", "require_run", "config_hash", "read_summary", "resolve_device", "run_dir_for", "ContrastiveConfig",
           "contrastive_embeddings", "contrastive_retrieval", "four_way_encoder", "load_contrastive",
           "pretrain_contrastive"]
