"""The Triton selective scan against the sequential reference, run by Triton's CPU interpreter.

The interpreter is chosen when triton is first imported (TRITON_INTERPRET=1), so the kernels run
in a child process started from this file (`python tests/test_ssm_triton.py`), which prints the
errors of every case as JSON; the tests read them. Without triton (or where its interpreter does
not run) the kernel tests skip and say why; `make test` installs triton (the `dev` extra).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# name: (batch, channels, state, length, per-sequence A, options used, dtype); lengths cross the
# kernel's 64-step checkpoints, channels and states are not powers of two (masked lanes)
CASES = {
    "plain": (2, 5, 3, 70, False, (), "float32"),
    "all-options": (2, 5, 3, 70, False, ("D", "z", "delta_bias", "softplus"), "float32"),
    "per-sequence-A": (3, 4, 4, 67, True, ("D", "z", "delta_bias", "softplus"), "float32"),
    "bias-no-softplus": (1, 3, 2, 9, False, ("delta_bias", "D"), "float32"),
    "length-1": (2, 3, 4, 1, False, ("D", "z", "delta_bias", "softplus"), "float32"),
    "bfloat16": (2, 6, 4, 40, False, ("D", "z", "delta_bias", "softplus"), "bfloat16"),
}
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _run_cases() -> dict:
    """Child process body: every case's forward, last-state and gradient errors (relative to max |ref|)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

    try:   # is the interpreter usable at all here (not our kernel's fault if not)?
        x = torch.zeros(4)
        _probe[(1,)](x, BLOCK=4)
        assert x.tolist() == [1.0] * 4, x.tolist()
    except Exception as e:  # noqa: BLE001 - reported to the parent as a skip reason
        return {"interpreter_error": f"{type(e).__name__}: {e}", "triton": triton.__version__}

    from cxpmrg_lib.models.ssm import selective_scan_reference
    from cxpmrg_lib.models.ssm_triton import selective_scan_triton

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    results = {"triton": triton.__version__, "torch": torch.__version__}
    for name, (b, d, n, L, per_seq, opts, dtype_name) in CASES.items():
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(len(name))
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        vec = (b, d) if per_seq else (d,)
        full = {"u": r(b, d, L), "delta": r(b, d, L) * 0.5,
                "A": -torch.exp(torch.rand(*((b,) if per_seq else ()), d, n, generator=g, dtype=torch.float64)),
                "B": r(b, n, L), "C": r(b, n, L), "D": r(*vec), "z": r(b, d, L), "delta_bias": r(*vec) * 0.3}
        use = {k: v.to(dtype) for k, v in full.items() if k in "u delta A B C".split() or k in opts}
        softplus = "softplus" in opts
        weight = r(b, d, L)
        # the reference computes in float64 on float32 cases (so its own rounding does not count) and, like
        # the kernel, in float32 from the bfloat16 inputs on bfloat16 cases
        ref_in = {k: v.to(torch.float64 if dtype == torch.float32 else dtype).detach().clone().requires_grad_()
                  for k, v in use.items()}
        tri_in = {k: v.clone().requires_grad_() for k, v in use.items()}
        kw = lambda t: dict(D=t.get("D"), z=t.get("z"), delta_bias=t.get("delta_bias"), delta_softplus=softplus)  # noqa: E731
        ref = selective_scan_reference(ref_in["u"], ref_in["delta"], ref_in["A"], ref_in["B"], ref_in["C"], **kw(ref_in))
        out, last = selective_scan_triton(tri_in["u"], tri_in["delta"], tri_in["A"], tri_in["B"], tri_in["C"],
                                          **kw(tri_in), return_last_state=True)
        (ref.double() * weight).sum().backward()
        (out.double() * weight).sum().backward()
        with torch.no_grad():   # the forward without checkpoints (no backward can follow) gives the same
            out_nograd = selective_scan_triton(tri_in["u"], tri_in["delta"], tri_in["A"], tri_in["B"], tri_in["C"],
                                               **kw(tri_in))
        # the final state, by the recurrence written out here
        x = use["delta"].double() + (use["delta_bias"].double()[..., None] if "delta_bias" in use else 0)
        dt = torch.nn.functional.softplus(x) if softplus else x
        A = use["A"].double().expand(b, d, n)
        h = torch.zeros(b, d, n, dtype=torch.float64)
        for t in range(L):
            h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * use["u"].double()[:, :, t])[..., None] \
                * use["B"].double()[:, None, :, t]
        results[name] = {
            "out_dtype": str(out.dtype).replace("torch.", ""), "out_shape": list(out.shape),
            "last_shape": list(last.shape), "forward": rel(out, ref), "last_state": rel(last, h),
            "no_grad_equal": bool(torch.equal(out_nograd, out.detach())),
            "grads": {k: rel(tri_in[k].grad, ref_in[k].grad) for k in use},
            "grad_dtypes": sorted({str(tri_in[k].grad.dtype).replace("torch.", "") for k in use}),
        }
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so the Triton scan cannot run here (the `dev` extra pins it: "
                    "pip install -e '.[dev]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"the interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "interpreter_error" in results:
        pytest.skip(f"Triton {results['triton']}'s CPU interpreter does not run here: {results['interpreter_error']}")
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_scan_matches_reference_in_interpreter(interpreted, case):
    b, d, n, L, per_seq, opts, dtype = CASES[case]
    res = interpreted[case]
    assert res["out_dtype"] == dtype and res["out_shape"] == [b, d, L] and res["last_shape"] == [b, d, n]
    assert res["forward"] < TOL[dtype], res
    assert res["last_state"] < (1e-5 if dtype == "float32" else 3e-2), res
    assert res["no_grad_equal"], res
    assert res["grad_dtypes"] == [dtype], res
    expected = {"u", "delta", "A", "B", "C"} | {k for k in ("D", "z", "delta_bias") if k in opts}
    assert set(res["grads"]) == expected
    for k, err in res["grads"].items():
        assert err < TOL[dtype], (k, res)


def test_module_import_fails_cleanly_without_triton():
    """No triton: the kernel module raises ImportError naming the extra; the rest of the library imports."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import cxpmrg_lib.models.vision_mamba, cxpmrg_lib.presets\n"
            "try:\n    import cxpmrg_lib.models.ssm_triton\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError:" in proc.stdout and "[cuda]" in proc.stdout, proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cpu_tensors_without_interpreter_get_a_clear_error():
    code = ("import os, torch\nos.environ.pop('TRITON_INTERPRET', None)\n"
            "from cxpmrg_lib.models.ssm_triton import selective_scan_triton\n"
            "u = torch.randn(1, 2, 3); B = torch.randn(1, 4, 3)\n"
            "try:\n    selective_scan_triton(u, u, -torch.ones(2, 4), B, B)\n"
            "except ValueError as e:\n    print('ValueError:', e)\n"
            "try:\n    selective_scan_triton(u, u, -torch.ones(3, 4), B, B)\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ValueError:")]
    assert len(lines) == 2, proc.stdout
    assert "CUDA tensors" in lines[0] and "cpu" in lines[0]
    assert "A must be" in lines[1]


AOT_COMPILE = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cxpmrg_lib.models import ssm_triton as st
out = {}
for fn, extra in ((st._scan_fwd_kernel, dict(SAVE_CKPT=True, SAVE_LAST=True)), (st._scan_bwd_kernel, {})):
    for flag in (True, False):
        consts = dict(HAS_D=flag, HAS_Z=flag, HAS_BIAS=flag, SOFTPLUS=flag, CHUNK_T=st.CHUNK, BLOCK_D=16, BLOCK_N=16,
                      **extra)
        sig = {a: "constexpr" if a in consts else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 2})
        out[f"{fn.__name__}/{flag}"] = {"cubin": len(k.asm["cubin"]), "spills": ".local" in k.asm["ptx"]}
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter is lenient (types, loop bounds): compiling to sm_90 machine code (ptxas ships with
    triton) checks what the GPU will run, with every optional input on and off, and that nothing spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"})
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip(f"this triton build cannot compile for CUDA here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(kernels) == 4
    for name, k in kernels.items():
        assert k["cubin"] > 1000 and not k["spills"], (name, k)


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
