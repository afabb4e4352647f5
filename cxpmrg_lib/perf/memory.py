"""Peak resident memory of a block of code, sampled from /proc every 10 ms (the peak the OS reports elsewhere)."""
from __future__ import annotations

import os
import threading

__all__ = ["PeakMemory"]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the peak RSS the OS reports (monotonic, so less precise)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager: the peak resident memory above the level at entry (`extra_mib`), and the peak (`peak_mib`)."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.extra_mib = self.peak_mib = 0.0

    def __enter__(self) -> "PeakMemory":
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.extra_mib = (self._peak - self._start) / 2 ** 20
        self.peak_mib = self._peak / 2 ** 20
