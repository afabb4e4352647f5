"""The main job: run the notebooks in order through papermill, then build the Jupyter Book.

`make book` and `cxpmrg book` call `run_book`. Each notebook gets the parameters it
declares (unknown ones are not passed), stages reuse their caches, and the first
failing notebook stops the run with the failing cell's error.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cxpmrg_lib.util.fileio import write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The pipeline, in order. Later issues append notebooks here and to book/_toc.yml.
NOTEBOOKS = ["00_data", "01_autoregressive", "02_contrastive", "03_finetune", "04_benchmark", "05_efficiency",
             "06_explore", "07_reproducibility"]

# A smoke run checks the whole pipeline in minutes on tiny data (tests use it).
SMOKE_PARAMS = {
    "phantom_studies": 60,
    "phantom_size": 96,
    "iu_limit": 120,
    "iu_studies": 120,
    "smoke": True,
    # two training seeds: the seeds' folders, tables, tests and claims run end to end (the book's default is 3)
    "seeds": 2,
    # A smoke run's trainings take seconds: starting worker processes (cxpmrg_lib.util.parallel) would cost
    # more than they save (02-04 measured 50 s serial against 240 s with workers).
    "jobs": 1,
}


class NotebookFailed(RuntimeError):
    """A notebook of the pipeline raised; the message carries the failing cell's error."""


@dataclass
class StepResult:
    notebook: str
    seconds: float
    output: Path


def run_book(book_dir: str | os.PathLike = "book", params: dict | None = None, smoke: bool = False,
             only: list[str] | None = None, build: bool = True,
             notebooks_dir: str | os.PathLike | None = None) -> list[StepResult]:
    """Execute the pipeline notebooks into `book_dir/notebooks/` and build `book_dir/_build/html`."""
    book_dir = Path(book_dir).resolve()
    notebooks_dir = Path(notebooks_dir or REPO_ROOT / "notebooks").resolve()
    # The full run uses each notebook's own parameters cell, so `papermill notebooks/NN.ipynb`
    # alone gives the same result; only the folders are made absolute here.
    base: dict = {}
    if smoke:
        base.update(SMOKE_PARAMS)
        base.setdefault("data_root", str(book_dir.parent / "runs" / "smoke" / "data"))
        base.setdefault("run_root", str(book_dir.parent / "runs" / "smoke"))
    else:
        # relative to the kernels' working folder (REPO_ROOT): the published pages show "runs", not a
        # folder of the machine that built them
        base.setdefault("data_root", "data")
        base.setdefault("run_root", "runs")
    base.update(params or {})
    # every path of this machine that may turn up in a page, and what the page shows instead
    local = local_paths(book_dir, base)

    names = NOTEBOOKS if not only else [n for n in NOTEBOOKS if n in set(only)]
    unknown = set(only or []) - set(NOTEBOOKS)
    if unknown:
        raise ValueError(f"unknown notebook(s) {sorted(unknown)}; the pipeline has {NOTEBOOKS}")

    out_dir = book_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[StepResult] = []
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        src = notebooks_dir / f"{name}.ipynb"
        dst = out_dir / f"{name}.ipynb"
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        execute_notebook(src, dst, base, local)
        dt = time.perf_counter() - t0
        print(f"[{i}/{len(names)}] {name} done in {_fmt(dt)}", flush=True)
        results.append(StepResult(name, dt, dst))

    if build:
        print("building the Jupyter Book ...", flush=True)
        t0 = time.perf_counter()
        build_html(book_dir)
        results.append(StepResult("jupyter-book build", time.perf_counter() - t0, book_dir / "_build" / "html"))

    print("\ntime per stage:")
    for r in results:
        print(f"  {r.notebook:<22} {_fmt(r.seconds):>10}")
    print(f"  {'total':<22} {_fmt(time.perf_counter() - t_all):>10}")
    write_json(book_dir / "_build" / "pipeline_times.json",
               {"smoke": smoke, "params": base, "steps": {r.notebook: round(r.seconds, 2) for r in results}})
    if build:
        print(f"\nbook: {book_dir / '_build' / 'html' / 'index.html'}")
    return results


def execute_notebook(src: Path, dst: Path, params: dict, local: dict[str, str] | None = None) -> None:
    """Run one notebook with the parameters it declares; raise NotebookFailed naming the cell.

    The executed copy is made ready to publish (`for_the_page`): the injected parameters cell folded
    away like the notebook's own, and the paths in `local` (see `local_paths`) replaced."""
    import papermill as pm

    # papermill logs its input/output paths at INFO for every notebook: the pipeline's own
    # "[i/n] name ... done in" lines say the same thing once
    logging.getLogger("papermill").setLevel(logging.WARNING)
    if not src.exists():
        raise FileNotFoundError(f"notebook {src} not found")
    declared = pm.inspect_notebook(str(src))
    passed = {k: v for k, v in params.items() if k in declared}
    tmp = dst.with_name(f".{dst.name}.running.ipynb")
    # Progress bars inside the kernel would land in the book as frozen "0%" lines; the pipeline
    # reports progress per notebook instead (the kernel inherits this environment).
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        pm.execute_notebook(str(src), str(tmp), parameters=passed, kernel_name="python3",
                            cwd=str(REPO_ROOT), progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as e:
        # Keep the partly executed notebook for inspection, beside where it would have gone.
        failed = dst.with_name(f"{dst.stem}.failed.ipynb")
        where = "a cell"
        if tmp.exists():
            where = _failing_cell(tmp)
            os.replace(tmp, failed)
        raise NotebookFailed(
            f"{src.name} failed in {where}: {e.ename}: {e.evalue}\n"
            f"(the executed notebook is kept at {failed})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved
    for_the_page(tmp, local if local is not None else local_paths(dst.parent.parent, params))
    os.replace(tmp, dst)


def local_paths(book_dir: Path, params: dict) -> dict[str, str]:
    """{absolute path of this machine: what a page shows instead}, longest first, so that a reader sees
    `runs/x` for `<checkout>/runs/x`. The checkout and the book's parent folder become relative
    paths; an absolute path parameter outside them (a dataset root elsewhere) shows its last part;
    the Python installation and the home folder are named, not spelled out."""
    book_dir = Path(book_dir).resolve()
    roots = (REPO_ROOT, book_dir.parent)
    names: dict[str, str] = {}
    for root in roots:
        names[str(root) + os.sep] = ""
        names[str(root)] = "."
    for key, value in params.items():
        if isinstance(value, str) and os.path.isabs(value) and not any(
                value == str(r) or value.startswith(str(r) + os.sep) for r in roots):
            names.setdefault(value.rstrip(os.sep), f"<{key}: {Path(value).name}>")
    for prefix, shown in ((sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (str(Path.home()), "~")):
        if len(prefix) > 1:
            names.setdefault(prefix, shown)
    return dict(sorted(names.items(), key=lambda kv: -len(kv[0])))


def for_the_page(notebook: Path, local: dict[str, str]) -> None:
    """Rewrite an executed notebook in place for publishing: the papermill-injected parameters cell
    gets `hide-input` (one click away, as the parameters cell itself), and every path of `local`
    in the notebook's metadata, a cell's source or a text output is replaced by what a reader should see."""
    import nbformat

    # one pass, longest path first; a path not ending in a separator must end where a name ends
    # (`/a/run` is not replaced inside `/a/runs`)
    pattern = re.compile("|".join(re.escape(p) + ("" if p.endswith(os.sep) else r"(?![\w.-])") for p in local))

    def clean(text: str) -> str:
        return pattern.sub(lambda m: local[m.group(0)], text) if local else text

    def clean_value(value):
        if isinstance(value, str):
            return clean(value)
        if isinstance(value, list):
            return [clean_value(v) for v in value]
        if isinstance(value, dict):
            return {k: clean_value(v) for k, v in value.items()}
        return value

    nb = nbformat.read(notebook, as_version=4)
    nb.metadata = nbformat.from_dict(clean_value(nb.metadata))     # papermill's record: paths and parameters
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
        cell.source = clean(cell.source)
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = clean_value(output["text"])
            if "traceback" in output:
                output["traceback"] = clean_value(output["traceback"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith(("json", "+xml", "markdown")):
                    output["data"][mime] = clean_value(value)
    nbformat.write(nb, notebook)


def _failing_cell(executed: Path) -> str:
    """'cell N (first line)' of the first cell with an error output, N counted in the source notebook."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    skip = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [c for c in nb.cells if not skip & set(c.get("metadata", {}).get("tags", []))]
    for i, cell in enumerate(cells, 1):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
            return f"cell {i} ({first[:60]!r})"
    return "a cell"


def build_html(book_dir: Path) -> Path:
    """`jupyter-book build` (1.x, offline); notebooks are already executed, so it only renders."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    html = book_dir / "_build" / "html"
    log.info("built %s", html)
    return html


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"
