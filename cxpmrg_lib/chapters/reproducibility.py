"""What a reader needs to reproduce a number of this study: versions, commit, machine, every
run's configuration, the data's licences and checksums, and the command that remakes one number.

Everything here only reads files already on disk (run folders, manifests, dataset trees), so the
reproducibility chapter runs in seconds and also on a fresh checkout, where it says what to run first.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from cxpmrg_lib.runs import find_runs, is_finished, read_config, read_summary, wall_seconds

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = REPO_ROOT / "data_manifests"

# The distributions whose versions change numbers or the book (pip names).
PACKAGES = ["cxpmrg_lib", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy", "pandas",
            "scipy", "scikit-learn", "pillow", "matplotlib", "seaborn", "pycocoevalcap", "papermill", "nbclient",
            "ipykernel", "ipywidgets", "jupyter-book", "sphinx", "sphinx-book-theme", "mamba-ssm"]

# The notebooks that fill a run root, in order (the reproducibility chapter only reads it).
PRODUCING_NOTEBOOKS = ["00_data", "01_autoregressive", "02_contrastive", "03_finetune", "04_benchmark"]

_PHANTOM_DIR = re.compile(r"^phantom_n(?P<studies>\d+)_(?P<size>\d+)px_s(?P<seed>\d+)$")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


# ----------------------------------------------------------------------------- software and machine
def package_versions(packages: list[str] | None = None) -> pd.DataFrame:
    """Python and each package's installed version ('not installed' when absent, e.g. mamba-ssm on CPU)."""
    rows = [{"package": "python", "version": platform.python_version()}]
    for name in packages or PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": name, "version": version})
    return pd.DataFrame(rows)


def git_state(repo: str | os.PathLike = REPO_ROOT) -> dict:
    """The commit the code was at and whether the tree had uncommitted changes.

    A source archive (no .git) or a machine without git is not an error: the answer says so.
    Read-only: `--no-optional-locks` keeps `git status` from touching the index.
    """
    repo = Path(repo)

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                              text=True, check=True, timeout=20).stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        commit = git("rev-parse", "HEAD").strip()
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed: the commit is unknown"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None,
                "note": f"{repo} is not a git checkout (or has no commit yet): the commit is unknown"}
    changed = [ln for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    note = (f"{len(changed)} tracked file(s) differ from the commit: numbers may not match it exactly"
            if changed else "the tracked files are exactly the commit")
    return {"commit": commit, "dirty": bool(changed), "changed_files": [ln[3:] for ln in changed],
            "describe": git("log", "-1", "--format=%h %cs %s").strip(), "toplevel": top, "note": note}


def machine() -> dict:
    """Where the numbers were made: speed figures and float noise depend on it."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        usable = os.cpu_count()
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    from cxpmrg_lib.chapters.efficiency import cpu_name

    info["cpu_model"] = cpu_name()
    from cxpmrg_lib.models.ssm_build import build_flags, kernel_lanes

    info["kernel_build"] = " ".join(build_flags())      # a fixed ISA level per vector width (ssm_build)
    info["kernel_lanes"] = kernel_lanes()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


# ----------------------------------------------------------------------------- runs (read through cxpmrg_lib.runs)
def _read_yaml(path: Path) -> dict:
    """A YAML file that is not a run's (a dataset manifest)."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None


def _bench_system(parts: tuple[str, ...]) -> str:
    """The system of a benchmark row's folder: bench/<system>/<hash> (seed 0) or bench/seed_<k>/<system>/<hash>."""
    if len(parts) <= 4 or parts[2] != "bench":
        return ""
    return parts[4] if parts[3].startswith("seed_") and len(parts) > 5 else parts[3]


def run_table(run_root: str | os.PathLike) -> pd.DataFrame:
    """One row per run: where it is, what it trained on with which settings, whether it finished, how long it took.

    Folders follow `<run_root>/<dataset>/<preset>/<stage>/<hash>/` (benchmark systems one level
    deeper, `bench/<system>/<hash>/`); the stage and settings are read from config.yaml, not guessed.
    """
    run_root = Path(run_root)
    rows = []
    for run in find_runs(run_root):
        cfg = read_config(run)
        config, resolved = cfg.get("config") or {}, cfg.get("resolved") or {}
        summary = read_summary(run, missing_ok=True)
        train = resolved.get("train") or {}
        parts = run.relative_to(run_root).parts
        metrics = summary.get("test_metrics") or {}
        wall = wall_seconds(run)
        rows.append({
            "dataset": parts[0] if len(parts) > 1 else "",
            "preset": config.get("preset", parts[1] if len(parts) > 2 else ""),
            "stage": resolved.get("stage", parts[2] if len(parts) > 2 else "?"),
            "system": _bench_system(parts),
            "hash": run.name,
            "seed": config.get("seed"),
            "init": config.get("init", ""),
            "epochs": train.get("epochs", config.get("epochs")),
            "batch": train.get("batch_size", config.get("batch_size")),
            "lr": train.get("lr", config.get("lr")),
            "status": "finished" if summary else "unfinished",
            "steps": summary.get("steps"),
            "wall_min": round(wall / 60, 2) if wall is not None else None,
            "bleu4": metrics.get("bleu4"),
            "path": str(run.relative_to(run_root)),
        })
    columns = ["dataset", "preset", "stage", "system", "hash", "seed", "init", "epochs", "batch", "lr", "status",
               "steps", "wall_min", "bleu4", "path"]
    return pd.DataFrame(rows, columns=columns)


def missing_runs_message(run_root: str | os.PathLike) -> str | None:
    """None when the run root holds runs; otherwise what to run first (the chapter shows it instead of tables)."""
    if find_runs(run_root):
        return None
    order = ", ".join(f"`{n}`" for n in PRODUCING_NOTEBOOKS)
    return (f"No runs under `{run_root}` yet, so there is nothing to describe. Run the notebooks {order} first "
            f"(`make book` runs them in order), or pass `-p run_root DIR` pointing at an existing run root.")


# ----------------------------------------------------------------------------- data
def manifest_table(manifest_dir: str | os.PathLike = MANIFEST_DIR) -> pd.DataFrame:
    """Each dataset manifest's name, licence and whether its images and text may appear in a published book."""
    rows = []
    for path in sorted(Path(manifest_dir).glob("*.yaml")):
        m = _read_yaml(path)
        missing = [k for k in ("name", "licence", "redistributable") if k not in m]
        if missing:
            raise ValueError(f"{path} lacks {missing}: every dataset manifest states its name, licence and "
                             "whether it is redistributable")
        rows.append({"manifest": path.name, "name": m["name"], "kind": m.get("kind", ""),
                     "licence": m["licence"], "redistributable": bool(m["redistributable"]),
                     "synthetic": m.get("synthetic", False), "source": str(m.get("source", "")).strip()})
    return pd.DataFrame(rows)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(root: str | os.PathLike) -> dict:
    """sha256 of a dataset tree's index files (study CSV / annotation.json and the label files) and a count
    of its images. Fast: the images are counted and sized, not hashed (their index file pins the studies)."""
    from cxpmrg_lib.data.check import detect_kind

    root = Path(root)
    kind = detect_kind(root)
    if kind == "chexpert_plus":
        index = (sorted(root.glob("df_chexpert_plus_*.csv")) + sorted((root / "chexbert_labels").glob("*.json"))
                 + [p for p in [root / "phantom_truth.csv"] if p.exists()])
        image_dir = root / "PNG"
    elif kind == "r2gen":
        index = [root / "annotation.json"] + ([root / "mesh_mapping.json"] if (root / "mesh_mapping.json").exists()
                                               else [])
        image_dir = root / "images"
    else:
        index, image_dir = [root] if root.is_file() else [], None
    images = [p for p in image_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES] if image_dir else []
    return {"dataset": root.name, "kind": kind,
            "files": {str(p.relative_to(root)) if p != root else p.name: sha256_file(p) for p in index},
            "images": len(images), "image_mib": round(sum(p.stat().st_size for p in images) / 2**20, 1)}


def dataset_roots(run_root: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[Path]:
    """The dataset trees the runs were trained on (from their configs) plus those written under data_root."""
    roots: dict[str, Path] = {}
    for run in find_runs(run_root):
        ds = (read_config(run).get("config") or {}).get("dataset_root")
        if ds and Path(ds).exists():
            roots[str(Path(ds).resolve())] = Path(ds).resolve()
    if data_root and Path(data_root).is_dir():
        for p in sorted(Path(data_root).iterdir()):
            if p.is_dir() and ((p / "annotation.json").exists() or any(p.glob("df_chexpert_plus_*.csv"))):
                roots.setdefault(str(p.resolve()), p.resolve())
    return sorted(roots.values())


def checksum_table(roots: list[Path]) -> pd.DataFrame:
    """One row per index file of each dataset used: its sha256, beside the tree's image count."""
    rows = []
    for root in roots:
        fp = dataset_fingerprint(root)
        for name, digest in fp["files"].items():
            rows.append({"dataset": fp["dataset"], "kind": fp["kind"], "file": name, "sha256": digest,
                         "images": fp["images"], "image_mib": fp["image_mib"]})
    return pd.DataFrame(rows, columns=["dataset", "kind", "file", "sha256", "images", "image_mib"])


# ----------------------------------------------------------------------------- rerunning one number
def stage3_run(run_root: str | os.PathLike, init: str = "stage2") -> Path | None:
    """The finished stage-3 run of the full model (`init`) under a run root; the newest when several."""
    runs = [r for r in find_runs(run_root) if is_finished(r)
            and (read_config(r).get("resolved") or {}).get("stage") == "finetune"
            and (read_config(r).get("config") or {}).get("init") == init
            and "bench" not in r.relative_to(run_root).parts]
    return max(runs, key=lambda r: (r / "summary.json").stat().st_mtime) if runs else None


# What 03_finetune passes in a smoke run (its `smoke_budget`); a run with these settings came from smoke=True.
_SMOKE_STAGE3 = {"epochs": 1, "earlier_epochs": 1, "val_studies": 8, "test_studies": 16}


def rerun_commands(run_dir: str | os.PathLike, fresh_run_root: str = "runs-rerun") -> dict:
    """How to remake a stage-3 run's test BLEU-4, derived from its config.yaml.

    `papermill`: the chapter that made it (03_finetune) with the same parameters; into the same run root
    it reuses the cached run, into `fresh_run_root` it trains everything again. `cxpmrg`: the shell command
    for the same configuration, or None (with the reason) when the run used settings the CLI has no flag for
    (a smoke budget). `python`: rebuilds the config from config.yaml itself, so it is exact in every case.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    config, resolved = cfg.get("config") or {}, cfg.get("resolved") or {}
    if resolved.get("stage") != "finetune":
        raise ValueError(f"{run_dir} is not a stage-3 (finetune) run: its config.yaml says stage "
                         f"{resolved.get('stage')!r}")
    bleu4 = (read_summary(run_dir, missing_ok=True).get("test_metrics") or {}).get("bleu4")
    dataset = Path(config["dataset_root"])
    phantom = _PHANTOM_DIR.match(dataset.name)
    if phantom and int(phantom["seed"]) != config.get("seed", 0):
        phantom = None              # the notebooks' one `seed` cannot name this pair: pass the tree itself
    smoke = all(config.get(k) == v for k, v in _SMOKE_STAGE3.items())
    loader = config.get("loader") or {}

    # papermill: 03_finetune's parameter names
    params: list[tuple[str, object]] = []
    if phantom:
        params += [("data_root", str(dataset.parent)), ("phantom_studies", int(phantom["studies"])),
                   ("phantom_size", int(phantom["size"])), ("seed", int(phantom["seed"]))]
    else:
        params += [("dataset_root", str(dataset)), ("dataset_kind", config.get("dataset_kind", "auto")),
                   ("seed", config.get("seed", 0))]
    for key in ("section", "split"):
        if key in loader:
            params.append((key, loader[key]))
    params += [("preset", config.get("preset", "tiny")), ("device", config.get("device", "cpu"))]
    if config.get("epochs") and not smoke:
        params.append(("epochs", config["epochs"]))
    if config.get("lm_pretrained"):
        params.append(("lm_pretrained", config["lm_pretrained"]))
    if config.get("freeze_encoder"):
        params.append(("freeze_encoder", True))
    if config.get("num_beams", 3) != 3:
        params.append(("num_beams", config["num_beams"]))
    # a run recorded before the decoding choice existed was written with the fixed decoding
    fixed = config.get("decoding_choice", "fixed") != "validation"
    if fixed:
        params.append(("decoding_choice", "fixed"))
    if smoke:
        params.append(("smoke", True))

    def papermill(run_root: str) -> str:
        args = [f"-p {k} {shlex.quote(str(v))}" for k, v in params + [("run_root", run_root)]]
        return "papermill notebooks/03_finetune.ipynb 03_finetune.out.ipynb " + " ".join(args)

    # cxpmrg finetune: only the flags the CLI has
    no_flag = {k: config.get(k) for k, default in (("val_studies", 64), ("earlier_epochs", None),
                                                   ("max_studies", None), ("max_images", 2),
                                                   ("repetition_penalty", 2.0), ("no_repeat_ngram_size", 3),
                                                   ("encoder_pretraining", "none"), ("pretrain_root", None))
               if config.get(k, default) != default}
    if loader and loader != {"section": "findings", "split": "patient"}:
        no_flag["loader"] = loader
    cli = None
    if not no_flag:
        # the tree itself, not --data-root: the CLI's --seed would also pick the phantom's seed
        flags = [f"--dataset-root {shlex.quote(str(dataset))}", f"--kind {config.get('dataset_kind', 'auto')}"]
        flags += [f"--preset {config.get('preset', 'tiny')}", f"--seed {config.get('seed', 0)}",
                  f"--init {config.get('init', 'stage2')}", f"--device {config.get('device', 'auto')}"]
        for key in ("epochs", "max_steps", "batch_size", "lr", "test_studies"):
            if config.get(key) is not None:
                flags.append(f"--{key.replace('_', '-')} {config[key]}")
        if config.get("lm_pretrained"):
            flags.append(f"--lm-pretrained {shlex.quote(config['lm_pretrained'])}")
        if config.get("freeze_encoder"):
            flags.append("--freeze-encoder")
        flags.append(f"--beams {config.get('num_beams', 3)}")
        if fixed:
            flags.append("--decoding fixed")
        cli = f"cxpmrg finetune {' '.join(flags)} --run-root {fresh_run_root}"

    python = ("python -c \"import yaml; from cxpmrg_lib.stages import FinetuneConfig, finetune_report, read_summary; "
              f"c = yaml.safe_load(open('{run_dir / 'config.yaml'}'))['config']; c['run_root'] = '{fresh_run_root}'; "
              "print(read_summary(finetune_report(FinetuneConfig(**c)))['test_metrics']['bleu4'])\"")
    return {"run": str(run_dir), "bleu4": bleu4, "smoke": smoke,
            "papermill_reuse": papermill(str(config.get("run_root", "runs"))),
            "papermill_fresh": papermill(fresh_run_root), "cxpmrg": cli,
            "cxpmrg_missing": no_flag or None, "python": python}


def rerun_markdown(run_root: str | os.PathLike, fresh_run_root: str = "runs-rerun") -> str:
    """The chapter's 'how to rerun one number' section for the full model's stage-3 BLEU-4 under `run_root`."""
    run = stage3_run(run_root)
    if run is None:
        return (f"No finished stage-3 run of the full model under `{run_root}`: run `03_finetune` first; "
                "this section then shows the commands that remake its BLEU-4.")
    c = rerun_commands(run, fresh_run_root)
    value = f"{c['bleu4']:.4g}" if c["bleu4"] is not None else "(not recorded)"
    lines = [f"The number: the test BLEU-4 of MambaXray-VL (stage 3 after stages 1 and 2), **{value}**, from the "
             f"run `{run.relative_to(run_root)}` under the run root{' (a smoke run)' if c['smoke'] else ''}.",
             "", "The chapter that made it, with the same parameters; into the same run root every stage is "
             "reused from its cache and the number is read back:", "", "```bash", c["papermill_reuse"], "```", "",
             f"The same into a fresh run root (`{fresh_run_root}`), which trains stage 1, stage 2, the report LM "
             "and stage 3 again from the same seeds:", "", "```bash", c["papermill_fresh"], "```", ""]
    if c["cxpmrg"]:
        lines += ["From the shell, without Jupyter:", "", "```bash", c["cxpmrg"], "```", ""]
    else:
        lines += [f"(`cxpmrg finetune` has no flag for {', '.join(sorted(c['cxpmrg_missing']))}, which this run "
                  "set, so there is no exact shell command for it.)", ""]
    lines += ["Exactly this configuration, rebuilt from the run's own config.yaml (prints the new BLEU-4):", "",
              "```bash", c["python"], "```"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what a rerun may move
def seed_yardstick(run_root: str | os.PathLike) -> pd.DataFrame:
    """How far a rerun of training moves a benchmark score, measured in this run: per benchmark (dataset) and
    metric, the number of seeds, the median and the largest seed standard deviation over the trained rows,
    and the largest spread between two seeds of one row (from the seed tables 04_benchmark saved)."""
    from cxpmrg_lib.bench.seeds import read_seed_tables, seed_spread_summary

    rows = []
    for name, table in read_seed_tables(run_root).items():
        for metric in ("ce_f1", "bleu4", "distinct"):
            s = seed_spread_summary(table, metric)
            rows.append({"benchmark": name, "metric": metric, "seeds": int(table["seeds"].max()),
                         "rows": s["rows"], "median seed sd": s["median_sd"], "largest seed sd": s["max_sd"],
                         "row": s["max_sd_row"], "largest seed spread": s["max_span"], "row ": s["max_span_row"]})
    return pd.DataFrame(rows)
