"""Progress bars: tqdm.auto, off when TQDM_DISABLE is set, inside Jupyter kernels too.

tqdm's console bar reads TQDM_DISABLE, but its notebook bar (what tqdm.auto picks in a kernel) does
not, so the book pipeline's kernels would still write frozen "0%" widget bars into the book.
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm as _tqdm


def tqdm(*args, **kwargs):
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
