"""Shared fixtures.

`smoke_book`: the book built once per test session from a smoke run (papermill runs every notebook
of the pipeline on tiny data, then Jupyter Book builds the HTML; about 5 minutes on 2 cores). The
book tests and the browser check both read it, so it is built once.

To iterate on those tests without rebuilding, point CXPMRG_SMOKE_BOOK at a book folder that an
earlier smoke run built, e.g. one made by

    python -c "from cxpmrg_lib.chapters.pipeline import run_book; run_book(book_dir='/tmp/smokebook/book', smoke=True,
               params={'data_root': '/tmp/smokebook/data'})"

and run `CXPMRG_SMOKE_BOOK=/tmp/smokebook/book pytest tests/test_browser.py`. The folder is used as
it is (nothing is rebuilt); its data root is taken to be `<book>/../data` (override with
CXPMRG_SMOKE_DATA) and its run root `<book>/../runs/smoke`, the smoke defaults.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SmokeBook:
    root: Path          # the folder holding book/, data/ and runs/smoke/
    book: Path          # the book source folder (with notebooks/ executed and _build/html built)
    data_root: Path
    steps: list         # pipeline.StepResult per notebook and the build, in order

    @property
    def html(self) -> Path:
        return self.book / "_build" / "html"

    @property
    def run_root(self) -> Path:
        return self.root / "runs" / "smoke"


def _steps_from_times(book: Path) -> list:
    """The steps of an earlier build, read back from the pipeline's own timing file."""
    from cxpmrg_lib.chapters.pipeline import StepResult

    times = book / "_build" / "pipeline_times.json"
    if not times.exists():
        raise pytest.UsageError(f"CXPMRG_SMOKE_BOOK={book}: {times} is missing; is that a book built by run_book?")
    steps = json.loads(times.read_text())["steps"]
    return [StepResult(name, seconds, book / "notebooks" / f"{name}.ipynb") for name, seconds in steps.items()]


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> SmokeBook:
    from cxpmrg_lib.chapters.pipeline import run_book

    override = os.environ.get("CXPMRG_SMOKE_BOOK")
    if override:
        book = Path(override).resolve()
        if not (book / "_build" / "html").is_dir():
            raise pytest.UsageError(f"CXPMRG_SMOKE_BOOK={override} has no _build/html: build it first")
        data_root = Path(os.environ.get("CXPMRG_SMOKE_DATA") or book.parent / "data").resolve()
        return SmokeBook(root=book.parent, book=book, data_root=data_root, steps=_steps_from_times(book))
    root = tmp_path_factory.mktemp("smoke")
    book = root / "book"
    shutil.copytree(ROOT / "book", book, ignore=shutil.ignore_patterns("_build", "notebooks"))
    data_root = root / "data"
    steps = run_book(book_dir=book, smoke=True, params={"data_root": str(data_root)})
    return SmokeBook(root=root, book=book, data_root=data_root, steps=steps)
