"""Make the embedded default datasets once and reuse them.

A dataset folder's name encodes the settings that produced it, and the generators
write it atomically, so an existing folder is complete and matches its name: it is
reused as is (a cache keyed by configuration, like the stages' run directories).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# The default phantom of the book and the CLI: 1,500 studies rendered at 128 px, the tiny encoder's input
# size (a larger render is only resized down again), sized so that the whole default book fits in
# 45 minutes on 2 CPU cores.
DEFAULT_PHANTOM_STUDIES = 1500
DEFAULT_PHANTOM_SIZE = 128


def phantom_dir(data_root: str | os.PathLike, studies: int, size: int, seed: int) -> Path:
    return Path(data_root) / f"phantom_n{studies}_{size}px_s{seed}"


def iu_phantom_dir(data_root: str | os.PathLike, size: int, seed: int, limit: int | None = None,
                   split: str = "random") -> Path:
    """iu-phantom_[n<limit>_]<size>px_s<seed> (the random 70/10/20 split); with split="r2gen"
    iu-phantom-r2gen_[n<limit>_]<size>px_s<seed>, a name no tree of the old layout has."""
    n = f"n{limit}_" if limit else ""
    if split == "random":
        return Path(data_root) / f"iu-phantom_{n}{size}px_s{seed}"
    if split == "r2gen":
        return Path(data_root) / f"iu-phantom-r2gen_{n}{size}px_s{seed}"
    raise ValueError(f"iu_phantom_dir: split must be 'random' or 'r2gen', not {split!r}")


def ensure_phantom(data_root: str | os.PathLike, studies: int = DEFAULT_PHANTOM_STUDIES, size: int = DEFAULT_PHANTOM_SIZE, seed: int = 0,
                   workers: int | None = None) -> Path:
    """The default synthetic CheXpert Plus tree, generated on first use."""
    from cxpmrg_lib.data.phantom import write_phantom

    out = phantom_dir(data_root, studies, size, seed)
    if out.exists():
        log.info("reusing the phantom at %s", out)
        return out
    log.info("writing a %d-study phantom (%d px, seed %d) to %s", studies, size, seed, out)
    return Path(write_phantom(out, studies=studies, size=size, seed=seed, workers=workers))


def ensure_iu_phantom(data_root: str | os.PathLike, size: int = DEFAULT_PHANTOM_SIZE, seed: int = 0, limit: int | None = None,
                      reports: str | os.PathLike | None = None, workers: int | None = None,
                      split: str = "random") -> Path:
    """The iu-phantom (real IU X-Ray reports, rendered radiographs), generated on first use.

    split="random": the first `limit` reports, split 70/10/20 at random (the book's default).
    split="r2gen": the whole collection with a findings section and R2Gen's split (296 val, 590
    test); `limit` keeps that membership, the first studies of each split in proportion
    (write_iu_phantom). A negative `limit`: every report (as None)."""
    from cxpmrg_lib.data.phantom import write_iu_phantom

    limit = None if limit is not None and limit < 0 else limit
    out = iu_phantom_dir(data_root, size, seed, limit or None, split=split)
    if out.exists():
        log.info("reusing the iu-phantom at %s", out)
        return out
    log.info("rendering the iu-phantom (%s reports, %s split, %d px) to %s", limit or "all", split, size, out)
    return Path(write_iu_phantom(out, reports=reports, size=size, seed=seed, limit=limit or None,
                                 workers=workers, split=split))
