"""One process at a time per run folder (on `filelock`).

Two processes that need the same earlier stage (two benchmark systems that share a
report LM, two notebooks started side by side) would otherwise both train it into the
same folder. `claim` takes an exclusive lock on `<run>/.lock` through filelock (flock on
POSIX, msvcrt on Windows: the system drops it when a process dies, so a crash never leaves
a stale lock); a second process waits for the first, then finds the run finished and
reuses it. While it waits it says who holds the run (pid, host, what it trains, since when:
`<run>/.lock.holder`, written by the holder) every few minutes, and it gives up after
`timeout` seconds (default: $CXPMRG_LOCK_TIMEOUT_S, else 12 hours) with an error naming
the holder. `release` gives the lock back once the run's summary is written. A process
never waits for a lock it holds itself.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

__all__ = ["claim", "release", "release_all", "held", "holder", "RunLockTimeout", "TIMEOUT_ENV"]

TIMEOUT_ENV = "CXPMRG_LOCK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 12 * 3600.0
WAIT_LOG_S = 300.0                      # how often a waiting process says it still waits
LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.holder"

_HELD: dict[Path, FileLock] = {}


class RunLockTimeout(TimeoutError):
    """Waited longer than the timeout for another process's run folder."""


def _key(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve()


def held() -> list[Path]:
    """Run folders this process holds."""
    return list(_HELD)


def holder(run_dir: str | os.PathLike) -> str:
    """Who holds (or last held) `run_dir`, in words, from its holder file."""
    try:
        info = json.loads((_key(run_dir) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return "an unknown process (no holder file)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('label')}, since {since})"


def _timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def claim(run_dir: str | os.PathLike, label: str = "run", timeout: float | None = None) -> None:
    """Hold `run_dir` for this process, waiting while another process holds it (at most `timeout` s)."""
    key = _key(run_dir)
    if key in _HELD:
        return
    key.mkdir(parents=True, exist_ok=True)
    lock = FileLock(key / LOCK_NAME, thread_local=False)
    limit = _timeout(timeout)
    start = time.monotonic()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: %s is held by %s; waiting for it", label, key, holder(key))
        while True:
            left = limit - (time.monotonic() - start)
            if left <= 0:
                raise RunLockTimeout(f"{label}: waited {limit:.0f} s for {key}, held by {holder(key)}; if that "
                                     f"process is gone, its lock is too: retry (or raise {TIMEOUT_ENV})") from None
            try:
                lock.acquire(timeout=min(WAIT_LOG_S, left))
                break
            except Timeout:
                log.info("%s: still waiting for %s (%.0f min; held by %s)", label, key,
                         (time.monotonic() - start) / 60, holder(key))
    try:
        (key / HOLDER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "label": label, "since": time.time()}))
    except OSError as e:                 # the lock is what matters; the holder file only informs
        log.debug("could not write %s: %s", key / HOLDER_NAME, e)
    _HELD[key] = lock


def release(run_dir: str | os.PathLike) -> None:
    key = _key(run_dir)
    lock = _HELD.pop(key, None)
    if lock is not None:
        (key / HOLDER_NAME).unlink(missing_ok=True)   # before the lock goes: the next holder writes its own
        lock.release(force=True)


def release_all() -> None:
    """Give back every lock of this process (a worker does this after each job, failed or not)."""
    for key in list(_HELD):
        release(key)
