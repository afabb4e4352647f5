"""Where a book chapter's log goes: a file in the run root, not the page.

A chapter's kernel logs every stage's progress at INFO (a benchmark run writes dozens of lines, full of
run folders). In the published page that is noise between a figure and its caption, so `start` sends
INFO and above to `<run_root>/logs/<chapter>.log` and lets only warnings and errors through to the
cell's output, where a reader should see them. `ChapterLog.summary()` is the one line the page shows
instead: how much was logged, how many warnings, and where the file is.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["ChapterLog", "start", "LOG_DIR"]

LOG_DIR = "logs"                 # below the run root
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PAGE_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines = self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        self.warnings += record.levelno >= logging.WARNING


class ChapterLog:
    """The handlers `start` installed on the root logger, and what they counted."""

    def __init__(self, chapter: str, path: Path, counter: _Counter):
        self.chapter, self.path, self._counter = chapter, path, counter
        self._seen = (0, 0)

    @property
    def lines(self) -> int:
        return self._counter.lines

    @property
    def warnings(self) -> int:
        return self._counter.warnings

    def shown_path(self) -> str:
        """The log's path relative to the working folder when it lies below it (a page shows no path
        of the machine that built it), else relative to the run root."""
        try:
            return str(self.path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return f"{LOG_DIR}/{self.path.name} in the run root"

    def summary(self) -> str:
        """One line for the page: the lines and warnings logged since the last summary, and the file."""
        lines, warnings = self.lines - self._seen[0], self.warnings - self._seen[1]
        self._seen = (self.lines, self.warnings)
        for handler in logging.getLogger().handlers:
            handler.flush()
        warned = f", {warnings} warning{'s' * (warnings != 1)} (shown above)" if warnings else ", no warnings"
        return f"log: {lines} line{'s' * (lines != 1)}{warned}; full log in {self.shown_path()}"


def start(chapter: str, run_root: str | os.PathLike, page_level: int = logging.WARNING) -> ChapterLog:
    """Route the root logger for one chapter: INFO and above into `<run_root>/logs/<chapter>.log`
    (rewritten at each execution), `page_level` and above to stderr, the cell's output."""
    path = Path(run_root) / LOG_DIR / f"{chapter}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):          # a re-run cell or basicConfig's handler: replaced, not doubled
        root.removeHandler(handler)
        handler.close()
    to_file = logging.FileHandler(path, mode="w", encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_page = logging.StreamHandler(sys.stderr)
    to_page.setLevel(page_level)
    to_page.setFormatter(logging.Formatter(PAGE_FORMAT))
    counter = _Counter()
    for handler in (to_file, to_page, counter):
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return ChapterLog(chapter, path, counter)
