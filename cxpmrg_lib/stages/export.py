"""A stage-3 run as a folder to share: weights, configs, the LM and a model card, loadable with no run tree.

`export_generator(run_dir)` writes `<run_dir>/export/` (finished stage-3 runs get it automatically):

* `config.json`: what the model is (the encoder config, the decoding defaults, the image size, the
  number of views, the typical report length) and `"format": "cxpmrg-report-generator"`;
* `model.safetensors`: the kept weights (the best validation checkpoint, else the last), which hold
  the encoder and the projection; the frozen LM is not in them;
* `lm/`: the frozen LM's own folder (config, tokenizer, weights) when it is the project's small
  report LM. A local pretrained LM (Llama-2 and the like) is not copied, for its size and its
  licence: `config.json` names where it was, and `load_exported(folder, lm_dir=...)` takes another
  place;
* `README.md`: the model card (what the model is, the data and split it was trained on, its test
  metrics with 95% bootstrap intervals, how to load it, and the licence of the data).

The folder follows huggingface_hub's ModelHubMixin layout (config.json beside model.safetensors)
and is read fully offline; `ReportGenerator.from_pretrained(folder)` takes it as it takes a run folder.
Files are hard links to the run's own where the file system allows, so an export costs no space.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cxpmrg_lib.util.fileio import atomic_dir

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "export_generator", "export_released", "load_exported", "model_card", "is_export"]

FORMAT = "cxpmrg-report-generator"
_METRICS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"), ("meteor", "METEOR"),
            ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"), ("ce_precision", "CE precision"), ("ce_recall", "CE recall"),
            ("ce_f1", "CE F1")]
_INITS = {"stage2": "stages 1 and 2 (the full MambaXray-VL)", "stage1": "stage 1 only (ablation)",
          "random": "random (ablation: no pre-training)", "stage2_random": "stage 2 from a random start (ablation)"}


def is_export(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _project_lm(lm_dir: Path) -> bool:
    """Is this LM folder the project's own report-LM stage output (small, ours to share)?"""
    return lm_dir.name == "lm" and lm_dir.parent.parent.name == "report_lm" and (lm_dir.parent / "config.yaml").exists()


def _data_facts(dataset_root: str, dataset_kind: str) -> dict:
    # The dataset's name and licence; the publishing rules own those facts (data/licence.py).
    from cxpmrg_lib.data.licence import policy

    pol = policy(dataset_root, dataset_kind)
    return {"name": pol.name, "licence": pol.licence, "redistributable": pol.redistributable,
            "citation": pol.citation, "synthetic": pol.dataset in ("phantom", "iu_phantom")}


def model_card(config: dict, summary: dict, run_config: dict, data: dict, lm_included: bool) -> str:
    """The README.md of an export, from its config.json, the run's summary.json and config.yaml."""
    enc = config["encoder"]
    init = summary.get("init") or run_config.get("init", "stage2")
    metrics, ci = summary.get("test_metrics") or {}, summary.get("test_ci") or {}
    lines = [f"# MambaXray-VL report generator ({run_config.get('preset', 'tiny')} preset), run {summary.get('config_hash', '?')}",
             "",
             "Writes the findings section of a chest X-ray report from one or more views of a study. Built and "
             "trained with cxpmrg_lib, following CXPMRG-Bench (Wang et al., CVPR 2025): a "
             f"{enc.get('scan', '4-way')} Vision Mamba encoder ({enc['depth']} blocks, width {enc['dim']}, "
             f"{enc['patch_size']}-pixel patches, {enc['image_size']} px grey images, at most {config['max_images']} "
             "views averaged), a Linear + LayerNorm projection of its tokens into the image slot of a frozen causal "
             f"language model, and beam search. Encoder started from {_INITS.get(init, init)}.",
             "",
             "## Training data",
             "",
             f"- Dataset: {data['name']} (`{Path(run_config.get('dataset_root', '')).name}`)"
             + (": **synthetic** radiographs, not for clinical use or conclusions about real images" if data["synthetic"]
                else "") + ".",
             f"- Split: {summary.get('train_studies', '?')} training studies ({_split_words(run_config)}); "
             f"{run_config.get('val_studies', 64)} validation studies chose the checkpoint "
             f"(best {(summary.get('best') or {}).get('metric', 'BLEU-4 + CE-F1')} at step "
             f"{(summary.get('best') or {}).get('step', '?')} of {summary.get('steps', '?')}).",
             f"- Seed {run_config.get('seed', 0)}; the run's whole configuration is in `config.json` and, in the run "
             "folder it came from, `config.yaml`.",
             "",
             f"## Test metrics ({summary.get('test_studies', '?')} test studies, 95% bootstrap intervals)",
             "",
             "| metric | value | 95% CI |", "|:--|--:|:--|"]
    for key, name in _METRICS:
        if key in metrics:
            lo, hi = (ci.get(key) or [float("nan"), float("nan")])[:2]
            lines.append(f"| {name} | {metrics[key]:.3f} | [{lo:.3f}, {hi:.3f}] |")
    lines += ["",
              "CE: clinical efficacy, the 14 CheXpert observations read by the project's rule labeller from the "
              "reference and the generated report (R2Gen convention: only positive counts).",
              "",
              "## How to load",
              "",
              "```python",
              "from cxpmrg_lib.stages.generate import ReportGenerator",
              "generator = ReportGenerator.from_pretrained(\"path/to/this/folder\")     # offline, CPU",
              "print(generator.generate([\"frontal.png\", \"lateral.png\"]))",
              "```",
              "",
              ("The frozen language model is in `lm/`." if lm_included else
               f"The frozen language model is **not** in this folder (a local pretrained LM: its size and licence "
               f"are its own). It was loaded from `{config.get('lm_source')}`; pass "
               "`ReportGenerator.from_pretrained(folder, lm_dir=...)` where it lies on your machine."),
              "",
              "## Licence of the data",
              "",
              f"{data['name']}: {data['licence']}."
              + ("" if data["redistributable"] else
                 " The dataset may not be redistributed; weights trained on it may carry the terms of its data use "
                 "agreement: read them before sharing this folder."),
              ]
    if data.get("citation"):
        lines += ["", f"Cite the data as: {data['citation']}"]
    return "\n".join(lines) + "\n"


def _split_words(run_config: dict) -> str:
    loader = run_config.get("loader") or {}
    words = []
    if loader.get("split"):
        words.append(f"{loader['split']} split")
    if loader.get("section"):
        words.append(f"{loader['section']} section")
    return ", ".join(words) or "the dataset's split"


def export_generator(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     overwrite: bool = True) -> Path:
    """Write a finished stage-3 run's shareable folder (default `<run_dir>/export`); returns it."""
    from cxpmrg_lib.runs import read_config, read_summary, require_run

    run_dir = require_run(run_dir, "finetune")
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    generator = json.loads((run_dir / "generator.json").read_text())
    run_config = read_config(run_dir).get("config") or {}
    summary = read_summary(run_dir)
    weights = run_dir / "best" if (run_dir / "best" / "model.safetensors").exists() else run_dir / "model"
    lm_dir = Path(generator["lm_dir"])
    lm_included = _project_lm(lm_dir)
    config = {"format": FORMAT, "version": 1, **{k: v for k, v in generator.items() if k != "lm_dir"},
              "lm": "lm" if lm_included else None, "lm_source": str(lm_dir), "init": summary.get("init"),
              "run": run_dir.name}
    data = _data_facts(run_config.get("dataset_root", ""), run_config.get("dataset_kind", "auto"))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _link_or_copy(weights / "model.safetensors", tmp / "model.safetensors")
        if lm_included:
            (tmp / "lm").mkdir()
            for f in sorted(lm_dir.iterdir()):
                if f.is_file():
                    _link_or_copy(f, tmp / "lm" / f.name)
        (tmp / "README.md").write_text(model_card(config, summary, run_config, data, lm_included))
    log.info("stage 3: the shareable folder (weights, LM, model card) is %s", out)
    return out


def load_exported(folder: str | os.PathLike, lm_dir: str | os.PathLike | None = None):
    """The ReportModel of an exported folder (CPU, eval mode), with nothing but the folder (and, for a
    local pretrained LM that was not copied, `lm_dir` or the path it was loaded from)."""
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import ReportLMConfig, VisualPrefixLM, load_report_lm
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
    from cxpmrg_lib.trainer import load_weights

    folder = Path(folder)
    if not is_export(folder):
        raise ValueError(f"{folder} is not an exported report generator (its config.json lacks "
                         f"\"format\": \"{FORMAT}\"); a stage-3 run folder loads with load_report_model")
    cfg = json.loads((folder / "config.json").read_text())
    lm_path = Path(lm_dir) if lm_dir is not None else (folder / cfg["lm"] if cfg.get("lm") else Path(cfg["lm_source"]))
    if not (lm_path / "config.json").exists():
        raise FileNotFoundError(f"{folder}: its language model is not at {lm_path}; pass lm_dir= where it is")
    lm, tokenizer = load_report_lm(ReportLMConfig(pretrained=str(lm_path)))
    encoder = VisionMamba(EncoderConfig(**cfg["encoder"]))
    head = VisualPrefixLM(lm, tokenizer, encoder.config.dim, typical_report_tokens=cfg["typical_report_tokens"])
    model = ReportModel(encoder, head, freeze_encoder=cfg["freeze_encoder"])
    load_weights(model, folder)
    model.decoding = cfg["decoding"]
    model.image_size, model.max_images = cfg["image_size"], cfg["max_images"]
    model.summary = None
    return model.eval()


def export_released(source, out_dir: str | os.PathLike, include_lm: bool = True, overwrite: bool = False) -> Path:
    """A stage-3 model of ours whose encoder is the released architecture (`EncoderConfig(arch="released")`),
    written in the released MambaXray-VL formats: `<out_dir>/stage2.pth`, `<out_dir>/stage3.pth`
    (`models.released_report.released_checkpoints`) and, with `include_lm`, `<out_dir>/llm/` (the frozen LM and
    its tokenizer). `ReportGenerator.from_released(out/"stage3.pth", out/"llm", stage2=out/"stage2.pth")` and
    the released code read them. `source`: a stage-3 run folder (its `export/`), that export, or a loaded
    `ReportModel`."""
    import torch

    from cxpmrg_lib.models.released_report import released_checkpoints

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source) if is_export(source) else Path(source) / "export"
        if not is_export(folder):
            raise FileNotFoundError(f"{source}: neither a stage-3 run with an export/ folder nor an export")
        model = load_exported(folder)
    else:
        model = source
    stage2, stage3 = released_checkpoints(model)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        torch.save(stage2, tmp / "stage2.pth")
        torch.save(stage3, tmp / "stage3.pth")
        if include_lm:
            model.head.lm.save_pretrained(tmp / "llm")
            model.head.tokenizer.save_pretrained(tmp / "llm")
    log.info("the released-format files of the report model are in %s", out_dir)
    return Path(out_dir)
