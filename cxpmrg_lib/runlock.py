"""One process at a time per run folder.

Two processes that need the same earlier stage (two benchmark systems that share a
report LM, two notebooks started side by side) would otherwise both train it into the
same folder. `claim` takes an exclusive lock on `<run>/.lock` (flock: the system drops it
when a process dies, so a crash never leaves a stale lock); a second process waits for
the first, then finds the run finished and reuses it. `release` gives the lock back once
the run's summary is written. A process never waits for a lock it holds itself.
On a system without flock (Windows) runs are not locked.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:          # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

__all__ = ["claim", "release", "release_all", "held"]

_HELD: dict[Path, int] = {}


def _key(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve()


def held() -> list[Path]:
    """Run folders this process holds."""
    return list(_HELD)


def claim(run_dir: str | os.PathLike, label: str = "run") -> None:
    """Hold `run_dir` for this process, waiting while another process holds it."""
    key = _key(run_dir)
    if fcntl is None or key in _HELD:
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is training %s; waiting for it", label, key)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd


def release(run_dir: str | os.PathLike) -> None:
    fd = _HELD.pop(_key(run_dir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all() -> None:
    """Give back every lock of this process (a worker does this after each job, failed or not)."""
    for key in list(_HELD):
        release(key)
