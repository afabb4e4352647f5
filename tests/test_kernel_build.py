"""The compiled kernels' build flags: one ISA level per vector width, never the CPU's own target, so the same
seed gives the same bits on every x86 CPU of one vector width (see models/ssm_build.py)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxpmrg_lib.models import ssm_build

X86 = platform.machine().lower() in ("x86_64", "amd64")
V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3", "sse", "sse2"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# the extras two AVX-512 CPUs of different vendors and generations report beyond the v4 level
XEON_SPR = V4 | {"avx512_fp16", "amx_tile", "amx_bf16", "avx512_bf16", "avx512vnni", "avx512ifma", "gfni"}
XEON_CLX = V4 | {"avx512_vnni", "clwb", "pku"}
EPYC_ZEN5 = V4 | {"avx512_bf16", "avx512vnni", "sse4a", "clzero", "avx512_vp2intersect", "avx512vbmi2"}


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU flags ssm_build sees; the flags override is cleared."""
    monkeypatch.delenv(ssm_build.FLAGS_ENV, raising=False)
    monkeypatch.setattr(ssm_build.platform, "machine", lambda: "x86_64")

    def use(flags):
        monkeypatch.setattr(ssm_build, "_cpu_flags", lambda: set(flags))
    return use


def test_this_machines_flags_name_no_cpu_dependent_target(monkeypatch):
    monkeypatch.delenv(ssm_build.FLAGS_ENV, raising=False)
    flags = ssm_build.build_flags()
    if not X86:
        pytest.skip("the fixed ISA levels are x86-64's")
    assert not any("native" in f for f in flags), flags
    assert [f for f in flags if f.startswith("-march=")] == [f"-march={ssm_build.isa_level()}"]
    assert ssm_build.isa_level() in {"x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64"}
    assert "-mtune=generic" in flags and "-ffp-contract=fast" in flags
    assert not any(f.startswith(("-ffast-math", "-mrecip", "-Ofast", "-funsafe")) for f in flags)
    if ssm_build._compiler()[1]:
        assert "--param=avoid-fma-max-bits=0" in flags


@pytest.mark.parametrize("cpus,level,lanes", [
    ((XEON_SPR, XEON_CLX, EPYC_ZEN5, V4), "x86-64-v4", "16 float lanes (AVX-512)"),
    ((V3, V3 | {"sse4a", "clzero"}, V3 | {"avx_vnni"}), "x86-64-v3", "8 float lanes (AVX2, no AVX-512)"),
    ((V2, V2 | {"avx"}), "x86-64-v2", "8 float lanes (no AVX2: the compiler splits them)"),
])
def test_cpus_of_one_vector_width_get_the_same_flags_and_build(cpu, cpus, level, lanes):
    seen = set()
    for flags in cpus:
        cpu(flags)
        assert ssm_build.isa_level() == level and ssm_build.kernel_lanes() == lanes
        seen.add((tuple(ssm_build.build_flags()), ssm_build._build_name()))
    assert len(seen) == 1, seen
    (flags, _), = seen
    assert f"-march={level}" in flags and not any("native" in f for f in flags)


def test_avx512f_without_the_rest_of_v4_is_v3(cpu):
    cpu(V3 | {"avx512f"})        # a v4 build needs BW, CD, DQ and VL too (lanes.h keys on __AVX512F__)
    assert ssm_build.isa_level() == "x86-64-v3"


def test_the_build_name_changes_with_the_flags(cpu, monkeypatch):
    cpu(V4)
    default = ssm_build._build_name()
    monkeypatch.setenv(ssm_build.FLAGS_ENV, " ".join(ssm_build.build_flags()).replace("fast", "off"))
    assert "-ffp-contract=off" in ssm_build.build_flags() and ssm_build._build_name() != default
    cpu(V3)
    monkeypatch.delenv(ssm_build.FLAGS_ENV)
    assert ssm_build._build_name() != default


_PROBE = r"""
import sys, torch
torch.set_num_threads(1)
from cxpmrg_lib.models.ssm_build import load_kernel
assert load_kernel() is not None, "no kernel"
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
out = {}
for scan in ("1-way", "4-way"):
    torch.manual_seed(0)
    m = VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=32, depth=2, stem="conv", scan=scan))
    x = torch.randn(2, 1, 32, 32)
    y = m(x).tokens
    (y * torch.randn_like(y)).sum().backward()
    out[scan] = [y.detach()] + [p.grad for p in m.parameters()]
torch.save(out, sys.argv[1])
"""


def _probe(tmp_path: Path, name: str, cflags: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop(ssm_build.FLAGS_ENV, None)
    if cflags:
        env[ssm_build.FLAGS_ENV] = cflags
    path = tmp_path / f"{name}.pt"
    subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, check=True, timeout=900)
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CXPMRG_CROSS_TARGET"), reason="builds the kernels twice (~1-2 min): "
                    "set CXPMRG_CROSS_TARGET=1 to run")
def test_another_cpus_native_target_gives_the_same_bits(tmp_path, monkeypatch):
    """The fixed v4 build against a build for another AVX-512 CPU (Ice Lake server, its own tuning): the encoder's
    output and gradients bit for bit, 1-way and 4-way."""
    monkeypatch.delenv(ssm_build.FLAGS_ENV, raising=False)
    if ssm_build.isa_level() != "x86-64-v4" or ssm_build.kernel_problem() is not None:
        pytest.skip("needs an AVX-512 (x86-64-v4) CPU and a compiler")
    other = " ".join(f.replace("x86-64-v4", "icelake-server").replace("-mtune=generic", "-mtune=icelake-server")
                     for f in ssm_build.build_flags())
    ours, theirs = _probe(tmp_path, "fixed", None), _probe(tmp_path, "icelake", other)
    for scan in ours:
        assert all(torch.equal(a, b) for a, b in zip(ours[scan], theirs[scan], strict=True)), scan
