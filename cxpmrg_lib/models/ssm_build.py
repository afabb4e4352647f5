"""Build (once per machine) and load the compiled CPU kernels of `csrc/`: the selective scan and the mixer's
conv (`selective_scan.cpp`), the block's RMSNorm and SwiGLU gate (`fused_ops.cpp`), one extension.

torch.utils.cpp_extension compiles it with ninja into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), keyed by a hash of the source and its
path, the flags, the compiler, torch's version and the ISA level it targets, so it is compiled at
the first use on a machine and loaded from the cache afterwards; torch's own lock file makes
worker processes that start together wait for one build.

Same seed, same bits on every x86 CPU of one vector width: the build targets the x86-64 psABI
level this CPU meets (x86-64-v4 with AVX-512, v3 with AVX2 + FMA, else v2), never -march=native,
with generic tuning, FMA contraction stated (-ffp-contract=fast) and GCC's tuning-dependent
deferral of loop-carried FMA chains pinned off (--param=avoid-fma-max-bits=0). Under
-march=native the CPU picked the tuning, and a tuning that defers FMA chains of a vector width
(GCC's avoid_fma*_chains: 256 bits for znver2/3 in gcc 12, so the AVX2 build's lanes; newer GCCs
have a 512-bit one) leaves the RMSNorm's and the scan's accumulations as separate multiply and add:
other bits for the same seed. The compiler is part of the cache key: another compiler may
contract differently. On an AVX-512 CPU (AMD Zen 5, gcc 12.2) the fixed build gives the bits of
the old -march=native build, as do -march=skylake-avx512, cascadelake, icelake-server and
sapphirerapids builds. $CXPMRG_KERNEL_CFLAGS (space-separated) replaces the compile flags, for
cross-target checks only.
Nothing here raises: when the kernel cannot be had, `load_kernel` logs one line that says
what to install and returns None, and the caller runs the pure-PyTorch scan (same results).

    python -m cxpmrg_lib.models.ssm_build     # build now (make's venv step does this)
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["load_kernel", "kernel_problem", "kernel_lanes", "build_flags", "isa_level", "SOURCE", "SOURCES",
           "OPS_NAMESPACE"]

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "selective_scan.cpp"
SOURCES = (SOURCE, CSRC / "fused_ops.cpp")     # compiled into one library, ops under one namespace
HEADERS = (CSRC / "lanes.h",)
OPS_NAMESPACE = "cxpmrg_scan"
# -O3 without -ffast-math (the kernel's own vectorisable exp keeps IEEE semantics elsewhere);
# -fopenmp so at::parallel_for uses torch's OpenMP pool (libgomp.so.1 is torch's own at run time).
# The target is an ISA level (`isa_level`), not the CPU: see the module docstring.
LDFLAGS = ["-fopenmp"]
FLAGS_ENV = "CXPMRG_KERNEL_CFLAGS"
# The x86-64 psABI levels, highest first, by the /proc/cpuinfo flags each needs beyond the one below.
# v4 gives the kernel 16 float lanes (lanes.h: __AVX512F__), v3 and v2 give 8.
ISA_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
)

_state: dict = {}


def _cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo), empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return set()


def _native_key() -> str:
    """Off x86-64 the build is -march=native: valid where the CPU's feature list matches."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_level() -> str | None:
    """The highest x86-64 ISA level this CPU meets (the build's -march), or None off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags, needed = _cpu_flags(), set()
    levels = []
    for name, extra in reversed(ISA_LEVELS):     # v2, v3, v4: each needs the ones below it
        needed |= extra
        if needed <= flags:
            levels.append(name)
    return levels[-1] if levels else "x86-64"


def build_flags() -> list[str]:
    """The compile flags: a fixed ISA level per vector width, generic tuning, FMA contraction stated."""
    override = os.environ.get(FLAGS_ENV, "").strip()
    if override:
        return override.split()
    level = isa_level()
    if level is None:                           # not x86-64: the CPU's own target (no reproducibility claim)
        return ["-O3", "-march=native", "-fopenmp"]
    flags = ["-O3", f"-march={level}", "-mtune=generic", "-ffp-contract=fast"]
    if _compiler()[1]:                          # GCC: its tuning-dependent FMA-chain deferral pinned off
        flags.append("--param=avoid-fma-max-bits=0")
    return flags + ["-fopenmp"]


def _compiler() -> tuple[str, bool]:
    """(the C++ compiler's --version line, whether it is GCC), once per process."""
    if "compiler" not in _state:
        cxx = os.environ.get("CXX", "c++")
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        first = out.strip().splitlines()[0] if out.strip() else cxx
        _state["compiler"] = (first, bool(out) and "clang" not in out.lower())
    return _state["compiler"]


def kernel_lanes() -> str:
    """The lane vector the build gives this CPU (the kernel's block width), in words."""
    level = isa_level()
    if level == "x86-64-v4":
        return "16 float lanes (AVX-512)"
    if level == "x86-64-v3":
        return "8 float lanes (AVX2, no AVX-512)"
    return "8 float lanes (no AVX2: the compiler splits them)"


def _build_name() -> str:
    h = hashlib.sha256()
    # the source's path too: ninja rebuilds when the command line names another source file, so two
    # checkouts on one machine sharing one cache entry would rebuild each other's at every switch
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(build_flags() + LDFLAGS).encode(),
                 torch.__version__.encode(), str(isa_level() or _native_key()).encode(), _compiler()[0].encode(),
                 str(SOURCE.resolve()).encode()):
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
            load(name=_build_name(), sources=[str(p) for p in SOURCES], extra_cflags=build_flags(), extra_ldflags=list(LDFLAGS),
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
    logger.info("compiled selective scan ready (%s: %s, %s)", _build_name(), " ".join(build_flags()), _compiler()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
