"""What every stage shares: its config fields, starting and finishing its run folder (named by a hash of the
config: cxpmrg_lib.runs), the device."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from cxpmrg_lib.models.ssm import take_scan_impls
from cxpmrg_lib.presets import get_preset
from cxpmrg_lib.runs import SUMMARY_FILE, config_hash, is_finished, read_summary, require_run, run_dir_for
from cxpmrg_lib.stages.studies import DEFAULT_LOADER
from cxpmrg_lib.util import runlock
from cxpmrg_lib.util.errors import RunError
from cxpmrg_lib.util.fileio import write_json, write_text

log = logging.getLogger(__name__)

__all__ = ["StageConfig", "config_hash", "run_dir_for", "resolve_device", "read_summary", "start_run", "finish_run",
           "RunError", "require_run"]


@dataclass
class StageConfig:
    """Fields every stage config has. Training fields left as None take the preset's defaults
    (presets.py, the dict named by the subclass's `preset_defaults`)."""
    dataset_root: str
    dataset_kind: str = "auto"
    preset: str = "tiny"
    run_root: str = "runs"
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    loader: dict = field(default_factory=lambda: dict(DEFAULT_LOADER))  # load_study_table options
    device: str = "auto"                 # not part of the hash: the result does not depend on it beyond float noise
    on_bad_image: str = "skip"           # "skip": drop unreadable views and count them; "error": stop at the first
    # The dataset the earlier stages (1 and 2) pre-train on, when it is not this one (stage 3 and the benchmark
    # only): a small dataset's report generator starts from an encoder pre-trained on a larger one, as the
    # paper's IU X-Ray model starts from its CheXpert Plus pre-training. None: this dataset.
    pretrain_root: str | None = None
    pretrain_kind: str = "auto"
    pretrain_loader: dict | None = None  # its load_study_table options; None: the default loader

    preset_defaults = "stage1"           # class attribute, not a field

    def __post_init__(self):
        if self.on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', not {self.on_bad_image!r}")

    def train_settings(self) -> dict:
        """The preset's TrainConfig defaults with this config's non-None overrides."""
        settings = dict(getattr(get_preset(self.preset), self.preset_defaults))
        if self.epochs is not None and self.max_steps is None:
            settings.pop("max_steps", None)      # asked for epochs: a preset's step budget gives way to them
        for key in ("epochs", "max_steps", "batch_size", "lr"):
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        settings["seed"] = self.seed
        return settings

    def shared(self) -> dict:
        """The fields an earlier stage's config takes from this one (same data, preset, seed, folders)."""
        return {k: getattr(self, k) for k in ("dataset_root", "dataset_kind", "preset", "run_root", "seed",
                                              "loader", "device", "on_bad_image")}

    def earlier_shared(self) -> dict:
        """shared(), on the pre-training dataset when there is one: the fields of the earlier stages' configs
        (stage 1, stage 2) that a stage-3 or benchmark config asks for."""
        common = self.shared()
        if self.pretrain_root:
            common.update(dataset_root=self.pretrain_root, dataset_kind=self.pretrain_kind,
                          loader=dict(DEFAULT_LOADER if self.pretrain_loader is None else self.pretrain_loader))
        return common

    def pretraining_payload(self) -> dict:
        """The pre-training dataset as part of a hashed payload; empty without one (the hashes of runs made
        before the option are kept)."""
        if not self.pretrain_root:
            return {}
        return {"pretraining": StageConfig(**self.earlier_shared()).payload("pretraining")}

    def payload(self, stage: str) -> dict:
        """The start of the hashed description of a run: which stage on which data."""
        from cxpmrg_lib.data import detect_kind
        from cxpmrg_lib.data.check import loader_options

        # Options the tree's loader ignores (section= for an R2Gen tree) do not change the run.
        kind = detect_kind(self.dataset_root) if self.dataset_kind == "auto" else self.dataset_kind
        return {"stage": stage, "dataset": str(Path(self.dataset_root).resolve()),
                "dataset_kind": self.dataset_kind, "loader": loader_options(kind, self.loader)}


def start_run(config: StageConfig, stage: str, payload: dict, label: str) -> tuple[Path, bool]:
    """(run directory, finished). A finished run (summary.json present) is reused as is; a new or
    interrupted one is held for this process (another process training it is waited for: see
    runlock) and gets its config.yaml (the config and the hashed payload) written. The stage
    ends it with `finish_run`."""
    run_dir = run_dir_for(config.run_root, config.dataset_root, config.preset, stage, payload)
    if is_finished(run_dir):
        log.info("%s: reusing finished run %s", label, run_dir)
        return run_dir, True
    run_dir.mkdir(parents=True, exist_ok=True)
    runlock.claim(run_dir, label)
    if is_finished(run_dir):          # another process finished it while this one waited
        runlock.release(run_dir)
        log.info("%s: reusing run %s, finished by another process", label, run_dir)
        return run_dir, True
    write_text(run_dir / "config.yaml", yaml.safe_dump({"config": asdict(config), "resolved": payload},
                                                       sort_keys=False))
    take_scan_impls()                 # a new record of the scan paths: the summary names this run's own
    return run_dir, False


def finish_run(run_dir: Path, summary: dict) -> Path:
    """Write a run's summary.json (its presence marks the run finished) and release the run."""
    write_json(Path(run_dir) / SUMMARY_FILE, {**summary, "scan_impl": take_scan_impls()})  # not in the config hash
    runlock.release(run_dir)
    return Path(run_dir)


def resolve_device(device: str) -> str:
    """"auto" -> cuda when available, else cpu; a CUDA device asked for on a machine without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available")
    return device
