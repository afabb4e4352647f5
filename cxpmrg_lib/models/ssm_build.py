"""Build (once per machine) and load the compiled CPU kernels of `csrc/`: the selective scan and the mixer's
conv (`selective_scan.cpp`), the block's RMSNorm and SwiGLU gate (`fused_ops.cpp`), one extension.

torch.utils.cpp_extension compiles it with ninja into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), keyed by a hash of the source and its
path, the flags, torch's version and this CPU's instruction set (the build uses -march=native),
so it is compiled at the first use on a machine and loaded from the cache afterwards;
torch's own lock file makes worker processes that start together wait for one build.
Nothing here raises: when the kernel cannot be had, `load_kernel` logs one line that says
what to install and returns None, and the caller runs the pure-PyTorch scan (same results).

    python -m cxpmrg_lib.models.ssm_build     # build now (make's venv step does this)
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["load_kernel", "kernel_problem", "kernel_lanes", "SOURCE", "SOURCES", "OPS_NAMESPACE"]

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "selective_scan.cpp"
SOURCES = (SOURCE, CSRC / "fused_ops.cpp")     # compiled into one library, ops under one namespace
HEADERS = (CSRC / "lanes.h",)
OPS_NAMESPACE = "cxpmrg_scan"
# -O3 without -ffast-math (the kernel's own vectorisable exp keeps IEEE semantics elsewhere);
# -fopenmp so at::parallel_for uses torch's OpenMP pool (libgomp.so.1 is torch's own at run time).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_state: dict = {}


def _cpu_key() -> str:
    """The CPU's instruction-set flags: a -march=native build is only valid where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def kernel_lanes() -> str:
    """The lane vector the -march=native build gives this CPU (the kernel's block width), in words."""
    flags = set(_cpu_key().split())
    if "avx512f" in flags:
        return "16 float lanes (AVX-512)"
    if "avx2" in flags:
        return "8 float lanes (AVX2, no AVX-512)"
    return "8 float lanes (no AVX2: the compiler splits them)"


def _build_name() -> str:
    h = hashlib.sha256()
    # the source's path too: ninja rebuilds when the command line names another source file, so two
    # checkouts on one machine sharing one cache entry would rebuild each other's at every switch
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_key().encode(), str(SOURCE.resolve()).encode()):
        h.update(part)
    return f"cxpmrg_scan_{h.hexdigest()[:12]}"


def kernel_problem() -> str | None:
    """Why the kernel cannot be built here (what to install), or None when the tools are present."""
    missing = [p for p in SOURCES + HEADERS if not p.is_file()]
    if missing:
        return f"the kernel source {missing[0]} is missing from the installed package"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({cxx}) on PATH: install one (`apt-get install build-essential`)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "ninja is not installed: `python -m pip install ninja` (a pinned dependency of cxpmrg_lib)"
    if not sys.platform.startswith("linux"):
        return f"the compiled scan is built and tested on Linux only (this is {sys.platform})"
    return None


def load_kernel(verbose: bool = False):
    """torch.ops.cxpmrg_scan once the extension is built and loaded, else None (and one log line why)."""
    if "ops" in _state:
        return _state["ops"]
    ops = None
    problem = kernel_problem()
    if problem is None:
        try:
            from torch.utils.cpp_extension import load

            ninja_dir = Path(sys.executable).parent            # ninja's script in the venv, if not on PATH
            if shutil.which("ninja") is None and (ninja_dir / "ninja").exists():
                os.environ["PATH"] = f"{ninja_dir}{os.pathsep}{os.environ.get('PATH', '')}"
            load(name=_build_name(), sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                 is_python_module=False, verbose=verbose)
            ops = getattr(torch.ops, OPS_NAMESPACE)
            ops.scan_fwd, ops.rmsnorm_fwd                        # raise if the library did not register
        except Exception as e:                                   # a failed build must not stop a run
            tail = str(e).strip().splitlines()[-3:]
            problem = f"building {' and '.join(p.name for p in SOURCES)} failed ({' / '.join(tail)})"
            ops = None
    if ops is None:
        logger.warning("compiled selective scan unavailable: %s; using the pure-PyTorch scan (same results, "
                       "slower)", problem)
    _state["ops"] = ops
    _state["problem"] = problem
    return ops


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = load_kernel(verbose="-v" in sys.argv)
    if ops is None:
        return 0 if "--allow-missing" in sys.argv else 1
    logger.info("compiled selective scan ready (%s)", _build_name())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
