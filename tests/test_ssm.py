"""The fast selective scan against the sequential reference: values, gradients, edge cases."""
from __future__ import annotations

import logging

import pytest
import torch

from cxpmrg_lib.models import ssm
from cxpmrg_lib.models.ssm import selective_scan, selective_scan_fast, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, channels, state, length, dtype=torch.float64, seed=0, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {"u": r(batch, channels, length), "delta": r(batch, channels, length) * delta_scale,
            "A": -torch.exp(torch.rand(channels, state, generator=g, dtype=dtype) * 2),
            "B": r(batch, state, length), "C": r(batch, state, length), "D": r(channels),
            "z": r(batch, channels, length), "delta_bias": r(channels) * 0.1}


def run(fn, inputs, use, softplus, grad_names, weight):
    """Forward + backward of sum(out * weight); returns the output and the grads of `grad_names`."""
    args = {k: (v.detach().clone().requires_grad_(k in grad_names) if k in use or k in "u delta A B C".split()
                else None) for k, v in inputs.items()}
    out = fn(args["u"], args["delta"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"],
             delta_bias=args["delta_bias"], delta_softplus=softplus)
    if grad_names:
        (out * weight).sum().backward()
    return out.detach(), {k: args[k].grad for k in NAMES if args[k] is not None}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 time steps for a (2, 3, 4) state, so short sequences cross several chunk edges."""
    monkeypatch.setattr(ssm, "CHUNK_ELEMENTS", 2 * 3 * 4 * 3)


@pytest.mark.parametrize("use,softplus", [
    ((), False),
    (("D", "z", "delta_bias"), True),
    (("D",), True),
    (("z", "delta_bias"), False),
])
@pytest.mark.parametrize("length", [1, 7])
def test_gradcheck_fast_path_float64(small_chunks, use, softplus, length):
    inputs = make_inputs(2, 3, 4, length)
    names = ("u", "delta", "A", "B", "C") + tuple(use)
    tensors = [inputs[k].clone().requires_grad_() for k in names]

    def f(*ts):
        kw = dict(zip(names, ts))
        return selective_scan_fast(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], D=kw.get("D"), z=kw.get("z"),
                                   delta_bias=kw.get("delta_bias"), delta_softplus=softplus)

    assert torch.autograd.gradcheck(f, tensors)


def test_float32_matches_reference_on_benchmark_shape():
    inputs = make_inputs(8, 192, 16, 196, dtype=torch.float32, seed=1)
    weight = torch.randn(8, 192, 196, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = run(selective_scan_reference, inputs, NAMES, True, NAMES, weight)
    out, grads = run(selective_scan_fast, inputs, NAMES, True, NAMES, weight)
    assert out.dtype == torch.float32 and out.shape == (8, 192, 196)
    assert rel_err(out, ref_out) < 1e-4
    for k in NAMES:
        assert rel_err(grads[k], ref_grads[k]) < 1e-4, k


@pytest.mark.parametrize("length", [2, 3, 4, 5, 6, 10])
def test_lengths_around_chunk_edges_match_reference(small_chunks, length):
    inputs = make_inputs(2, 3, 4, length, seed=length)
    weight = torch.randn(2, 3, length, dtype=torch.float64)
    ref_out, ref_grads = run(selective_scan_reference, inputs, NAMES, True, NAMES, weight)
    out, grads = run(selective_scan_fast, inputs, NAMES, True, NAMES, weight)
    assert rel_err(out, ref_out) < 1e-12
    for k in NAMES:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


def test_long_sequence_with_strong_decay_stays_finite():
    length = 4096
    g = torch.Generator().manual_seed(3)
    inputs = make_inputs(1, 4, 8, length, seed=3)
    inputs["A"] = -torch.exp(torch.rand(4, 8, generator=g, dtype=torch.float64) * 3)
    inputs["delta"] = torch.rand(1, 4, length, generator=g, dtype=torch.float64) * 5
    # a closed form through exp(-cumsum(delta * A)) overflows float32 within a few steps
    assert torch.isinf(torch.exp(-torch.cumsum(inputs["delta"][0, :, :, None] * inputs["A"][:, None, :], 1))
                       .float()).any()
    weight = torch.randn(1, 4, length, generator=g, dtype=torch.float64)
    use = ("D", "z")
    # the lean loop (the reference's arithmetic with an O(L) backward; test_lean_reference_is_the_reference)
    ref_out, ref_grads = run(lambda *a, delta_softplus, **k: _lean_reference(*a, **k, softplus=delta_softplus)[0],
                             inputs, use, False, NAMES[:5] + use, weight)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    out, grads = run(selective_scan_fast, inputs32, use, False, NAMES[:5] + use, weight.float())
    assert torch.isfinite(out).all()
    assert rel_err(out.double(), ref_out) < 1e-5
    for k, v in grads.items():
        assert torch.isfinite(v).all(), k
        assert rel_err(v.double(), ref_grads[k]) < 1e-4, k


@pytest.mark.parametrize("grad_names", [("u",), ("A", "delta_bias"), ("B", "C", "z"), ("delta", "D")])
def test_grads_only_for_inputs_that_need_them(grad_names):
    inputs = make_inputs(2, 5, 3, 9, seed=4)
    weight = torch.randn(2, 5, 9, dtype=torch.float64)
    _, ref_grads = run(selective_scan_reference, inputs, NAMES, True, grad_names, weight)
    _, grads = run(selective_scan_fast, inputs, NAMES, True, grad_names, weight)
    for k in NAMES:
        if k in grad_names:
            assert rel_err(grads[k], ref_grads[k]) < 1e-12, k
        else:
            assert grads[k] is None, k


def test_no_grad_inputs_give_output_without_graph():
    inputs = make_inputs(2, 3, 4, 6)
    out, _ = run(selective_scan_fast, inputs, NAMES, True, (), None)
    ref, _ = run(selective_scan_reference, inputs, NAMES, True, (), None)
    assert out.grad_fn is None and rel_err(out, ref) < 1e-12


def _graph_size(out):
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return len(seen)


def test_graph_does_not_grow_with_length():
    sizes = []
    for length in (8, 64):
        inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 3, 4, length).items()}
        out = selective_scan_fast(*(inputs[k] for k in NAMES[:5]), D=inputs["D"], z=inputs["z"],
                                  delta_bias=inputs["delta_bias"], delta_softplus=True)
        sizes.append(_graph_size(out))
    ref = selective_scan_reference(*(inputs[k] for k in NAMES[:5]))
    assert sizes[0] == sizes[1] < 40 < _graph_size(ref)


def test_backward_twice_with_retained_graph():
    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 3, 4, 11).items()}
    out = selective_scan_fast(*(inputs[k] for k in NAMES[:5]), D=inputs["D"], z=inputs["z"])
    first = torch.autograd.grad(out.sum(), [inputs[k] for k in NAMES[:5]], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [inputs[k] for k in NAMES[:5]])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_bfloat16_computes_in_float32():
    inputs = make_inputs(2, 6, 4, 13, dtype=torch.float32, seed=5)
    weight = torch.randn(2, 6, 13)
    plain, plain_grads = run(selective_scan_fast, inputs, NAMES, True, NAMES, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(selective_scan_fast, inputs, NAMES, True, NAMES, weight)
    assert out.dtype == torch.float32 and torch.allclose(out, plain, rtol=1e-6, atol=1e-6)
    for k in NAMES:
        assert grads[k].dtype == torch.float32 and torch.allclose(grads[k], plain_grads[k], rtol=1e-5, atol=1e-5), k
    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, grads16 = run(selective_scan_fast, bf16, NAMES, True, NAMES, weight.bfloat16())
    assert out16.dtype == torch.bfloat16 and grads16["A"].dtype == torch.bfloat16
    assert rel_err(out16.float(), plain) < 0.05


def test_dispatch_and_errors(caplog, monkeypatch):
    inputs = make_inputs(1, 2, 3, 4)
    args = [inputs[k] for k in NAMES[:5]]
    monkeypatch.setenv(ssm.SCAN_ENV, "torch")
    ssm._logged.clear()
    with caplog.at_level(logging.INFO, logger="cxpmrg_lib.models.ssm"):
        fast = selective_scan(*args, D=inputs["D"])
        selective_scan(*args, D=inputs["D"])
    assert [r.getMessage() for r in caplog.records] == ["selective scan: pure-PyTorch path on cpu"]
    ref = selective_scan(*args, D=inputs["D"], impl="reference")
    assert rel_err(fast, ref) < 1e-12
    with pytest.raises(ValueError, match="impl"):
        selective_scan(*args, impl="cuda")
    with pytest.raises(ValueError, match=r"B must have shape \(1, 3, 4\)"):
        selective_scan(args[0], args[1], args[2], args[3][:, :, :2], args[4])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(args[0], args[1], args[2][:1], args[3], args[4])


def test_no_grad_mode_keeps_nothing_for_backward():
    from torch.profiler import ProfilerActivity, profile

    inputs = {k: v.float().requires_grad_() for k, v in make_inputs(2, 16, 8, 64).items()}

    def peak(grad: bool) -> int:
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = selective_scan_fast(*(inputs[k] for k in NAMES[:5]), D=inputs["D"])
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        total = 0
        for _, nbytes in events:
            total += nbytes
        assert out.shape == (2, 16, 64)
        return total                  # bytes still held when the forward returns (output included)

    kept_with_grad, kept_without = peak(True), peak(False)
    all_steps_exp = 64 * 2 * 16 * 8 * 4
    assert kept_without < 2 * 16 * 64 * 4 * 2 < all_steps_exp < kept_with_grad


def test_benchmark_scan_small_run_and_missing_mambapy(monkeypatch, tmp_path):
    import json
    import sys

    from cxpmrg_lib.perf.scan import MAMBAPY_INSTALL, benchmark_scan, format_scan_table

    result = benchmark_scan(lengths=(5,), batch=1, channels=4, state=2, repeats=2, include_mambapy=False,
                            out_json=tmp_path / "scan.json")
    entry = result["lengths"]["5"]
    ours = {"pytorch", "compiled"} if ssm.compiled_available() else {"pytorch"}
    assert set(entry["time_s"]) == {"reference", "lean_loop"} | ours
    for name in ours:
        assert entry["check_vs_reference"][name]["grad_max_rel_err"] < 1e-5
    assert all(v > 0 for v in entry["peak_mem_bytes"].values())
    assert json.loads((tmp_path / "scan.json").read_text())["memory_method"] == result["memory_method"]
    assert "reference/pytorch time" in format_scan_table(result)
    if ssm.compiled_available():
        assert entry["ratios"]["pytorch_time/compiled"] > 0 and "pytorch/compiled time" in format_scan_table(result)
    monkeypatch.setitem(sys.modules, "mambapy.mamba", None)      # makes `from mambapy.mamba import` fail
    with pytest.raises(RuntimeError, match=MAMBAPY_INSTALL.replace(".", r"\.")):
        benchmark_scan(lengths=(5,), batch=1, channels=4, state=2, repeats=1)


def test_per_sequence_parameters_match_separate_calls(small_chunks):
    """A (batch, channels, state), D and delta_bias (batch, channels): each sequence scanned with its
    own parameters, as separate calls would; gradchecked, and the reference agrees."""
    inputs = make_inputs(2, 3, 4, 7)
    g = torch.Generator().manual_seed(1)
    per_seq = {"A": -torch.exp(torch.rand(2, 3, 4, generator=g, dtype=torch.float64)),
               "D": torch.randn(2, 3, generator=g, dtype=torch.float64),
               "delta_bias": torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.1}
    names = ("u", "delta", "B", "C", "z")
    leaves = {k: inputs[k].clone().requires_grad_() for k in names}
    leaves.update({k: v.clone().requires_grad_() for k, v in per_seq.items()})

    def f(impl, **t):
        return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                              delta_bias=t["delta_bias"], delta_softplus=True, impl=impl)

    out = f("fast", **leaves)
    for i in range(2):
        one = selective_scan(inputs["u"][i:i + 1], inputs["delta"][i:i + 1], per_seq["A"][i], inputs["B"][i:i + 1],
                             inputs["C"][i:i + 1], D=per_seq["D"][i], z=inputs["z"][i:i + 1],
                             delta_bias=per_seq["delta_bias"][i], delta_softplus=True, impl="fast")
        assert rel_err(out[i:i + 1].detach(), one) < 1e-12
    assert rel_err(out.detach(), f("reference", **leaves).detach()) < 1e-12
    keys = list(leaves)
    assert torch.autograd.gradcheck(lambda *ts: f("fast", **dict(zip(keys, ts))), [leaves[k] for k in keys])
    with pytest.raises(ValueError, match="batch=2"):
        selective_scan(inputs["u"], inputs["delta"], per_seq["A"][:1], inputs["B"], inputs["C"])


# ----------------------------------------------------------------------------- the compiled CPU kernel

needs_kernel = pytest.mark.skipif(not ssm.compiled_available(), reason="the compiled scan did not build here "
                                  "(no C++ compiler or ninja; see the log)")


def _scan(impl, t, names, softplus=True, last=False, order=None):
    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t.get("D"), z=t.get("z"),
                          delta_bias=t.get("delta_bias"), delta_softplus=softplus, return_last_state=last,
                          order=order, impl=impl)


@needs_kernel
@pytest.mark.parametrize("use,softplus", [((), False), (("D", "z", "delta_bias"), True), (("D",), True)])
@pytest.mark.parametrize("length", [1, 70])                  # 70 crosses the kernel's 64-step checkpoints
def test_gradcheck_compiled_float64(use, softplus, length):
    inputs = make_inputs(1, 3, 4, length, seed=length)
    if not softplus:          # a negative step makes the states grow as exp(L): finite differences fail
        inputs["delta"] = inputs["delta"].abs()
    names = ("u", "delta", "A", "B", "C") + tuple(use)
    tensors = [inputs[k].clone().requires_grad_() for k in names]

    def f(*ts):
        return _scan("compiled", dict(zip(names, ts)), names, softplus=softplus, last=True)

    assert torch.autograd.gradcheck(f, tensors)


def _lean_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True):
    """A sequential float64 loop with an O(L) backward (one small node per step): the oracle of the
    long-sequence grid, where selective_scan_reference's O(L^2) backward would take minutes."""
    delta = delta + delta_bias[:, None] if delta_bias is not None else delta
    delta = torch.nn.functional.softplus(delta) if softplus else delta
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind, not slicing: a slice's backward writes a full-size gradient per step (O(L^2))
    for dt, b_t, c_t, u_t in zip(delta.unbind(2), B.unbind(2), C.unbind(2), u.unbind(2)):
        dt = dt[:, :, None]
        h = torch.exp(dt * A) * h + dt * b_t[:, None, :] * u_t[:, :, None]
        ys.append((h * c_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + (D[:, None] * u if D is not None else 0)
    return (y * torch.nn.functional.silu(z) if z is not None else y), h


def _mamba_grid_inputs(length, seed):
    """mamba-ssm's test_selective_scan inputs: batch 2, dim 4, dstate 8; A = -0.5 rand, delta 0.5 rand,
    delta_bias 0.5 rand, D, z, B, C randn."""
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(2, 4, length, generator=g), "delta": 0.5 * torch.rand(2, 4, length, generator=g),
            "A": -0.5 * torch.rand(4, 8, generator=g), "B": torch.randn(2, 8, length, generator=g),
            "C": torch.randn(2, 8, length, generator=g), "D": torch.randn(4, generator=g),
            "z": torch.randn(2, 4, length, generator=g), "delta_bias": 0.5 * torch.rand(4, generator=g)}


def test_lean_reference_is_the_reference():
    inputs = {k: v.double() for k, v in _mamba_grid_inputs(20, 0).items()}
    ref = selective_scan_reference(*(inputs[k] for k in NAMES[:5]), D=inputs["D"], z=inputs["z"],
                                   delta_bias=inputs["delta_bias"], delta_softplus=True, return_last_state=True)
    lean = _lean_reference(*(inputs[k] for k in NAMES))
    assert rel_err(lean[0], ref[0]) < 1e-12 and rel_err(lean[1], ref[1]) < 1e-12


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_kernel), "fast"])
@pytest.mark.parametrize("length", [128, 256, 512, 1024, 2048, 4096])
def test_mamba_ssm_grid_float32_tolerances(impl, length):
    """mamba-ssm's own selective-scan grid at its float32 tolerances (rtol 6e-4, atol 2e-3; gradients at
    twice those, as there), against a float64 sequential loop; the last state too."""
    rtol, atol = 6e-4, 2e-3
    inputs = _mamba_grid_inputs(length, length)
    ref = {k: v.double().requires_grad_() for k, v in inputs.items()}
    ref_out, ref_last = _lean_reference(*(ref[k] for k in NAMES))
    w = torch.randn(2, 4, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ((ref_out * w).sum() + ref_last.sum()).backward()
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = _scan(impl, ours, NAMES, last=True)
    ((out * w.float()).sum() + last.sum()).backward()
    assert torch.allclose(out.double(), ref_out.detach(), rtol=rtol, atol=atol)
    assert torch.allclose(last.double(), ref_last.detach(), rtol=rtol, atol=atol)
    for k in NAMES:
        assert torch.allclose(ours[k].grad.double(), ref[k].grad, rtol=2 * rtol, atol=2 * atol), k


@needs_kernel
def test_compiled_matches_pure_pytorch_path_on_benchmark_shape():
    inputs = make_inputs(8, 192, 16, 196, dtype=torch.float32, seed=1)
    weight = torch.randn(8, 192, 196, generator=torch.Generator().manual_seed(2))
    fast_out, fast_grads = run(lambda *a, **k: selective_scan(*a, **k, impl="fast"), inputs, NAMES, True, NAMES,
                               weight)
    out, grads = run(lambda *a, **k: selective_scan(*a, **k, impl="compiled"), inputs, NAMES, True, NAMES, weight)
    assert rel_err(out, fast_out) < 1e-5
    for k in NAMES:
        assert rel_err(grads[k], fast_grads[k]) < 1e-5, k


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_kernel), "fast", "reference"])
def test_order_equals_scanning_gathered_inputs(impl):
    """order[b] = the positions sequence b is scanned in; every (.., L) tensor stays in stored order."""
    batch, length = 3, 9
    inputs = make_inputs(batch, 5, 4, length, seed=7)
    g = torch.Generator().manual_seed(8)
    order = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = _scan(impl, leaves, NAMES, last=True, order=order)
    w = torch.randn(batch, 5, length, dtype=torch.float64)
    ((out * w).sum() + last.sum()).backward()

    def take(t, idx):
        return t.gather(2, idx[:, None, :].expand(-1, t.shape[1], -1))

    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    gathered = {k: (take(v, order) if v.dim() == 3 else v) for k, v in ref.items()}
    ref_out, ref_last = _scan("reference", gathered, NAMES, last=True)
    ref_out = take(ref_out, torch.argsort(order, dim=-1))
    ((ref_out * w).sum() + ref_last.sum()).backward()
    assert rel_err(out.detach(), ref_out.detach()) < 1e-12 and rel_err(last.detach(), ref_last.detach()) < 1e-12
    for k in NAMES:
        assert rel_err(leaves[k].grad, ref[k].grad) < 1e-11, k
    shared = _scan(impl, inputs, NAMES, order=order[0])            # one order (L,) for every sequence
    assert rel_err(shared, _scan(impl, inputs, NAMES, order=order[:1].expand(batch, -1))) < 1e-14
    with pytest.raises(ValueError, match="order must be"):
        _scan(impl, inputs, NAMES, order=order[:, :4])


@needs_kernel
def test_compiled_per_sequence_parameters_and_orders_gradcheck():
    inputs = make_inputs(2, 2, 3, 66, seed=9)
    g = torch.Generator().manual_seed(1)
    inputs.update({"A": -torch.exp(torch.rand(2, 2, 3, generator=g, dtype=torch.float64)),
                   "D": torch.randn(2, 2, generator=g, dtype=torch.float64),
                   "delta_bias": torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.1})
    order = torch.stack([torch.arange(66).flip(0), torch.randperm(66, generator=g)])
    keys = list(NAMES)
    leaves = [inputs[k].clone().requires_grad_() for k in keys]

    def f(*ts):
        return _scan("compiled", dict(zip(keys, ts)), NAMES, last=True, order=order)

    out, last = f(*leaves)
    ref_out, ref_last = _scan("reference", dict(zip(keys, leaves)), NAMES, last=True, order=order)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(last, ref_last) < 1e-12
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_kernel), "fast", "reference"])
def test_return_last_state(impl):
    inputs = make_inputs(2, 3, 4, 11, seed=10)
    out, last = _scan(impl, inputs, NAMES, last=True)
    assert last.shape == (2, 3, 4)
    assert torch.equal(out, _scan(impl, inputs, NAMES))
    # the last state is the state after the final step: scanning one step more with B = 0, C = e_n reads it
    longer = {k: (torch.cat([v, torch.zeros_like(v[..., :1])], -1) if v.dim() == 3 else v) for k, v in inputs.items()}
    _, last_ref = _scan("reference", inputs, NAMES, last=True)
    assert rel_err(last, last_ref) < 1e-12
    assert _scan(impl, longer, NAMES).shape[-1] == 12


@needs_kernel
def test_compiled_autocast_bfloat16():
    inputs = make_inputs(2, 20, 4, 70, dtype=torch.float32, seed=5)
    weight = torch.randn(2, 20, 70)
    compiled = lambda *a, **k: selective_scan(*a, **k, impl="compiled")  # noqa: E731
    plain, plain_grads = run(compiled, inputs, NAMES, True, NAMES, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(compiled, inputs, NAMES, True, NAMES, weight)
    assert out.dtype == torch.float32 and torch.equal(out, plain)
    for k in NAMES:
        assert grads[k].dtype == torch.float32 and torch.equal(grads[k], plain_grads[k]), k
    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, grads16 = run(compiled, bf16, NAMES, True, NAMES, weight.bfloat16())
    assert out16.dtype == torch.bfloat16 and grads16["A"].dtype == torch.bfloat16
    assert rel_err(out16.float(), plain) < 0.05


@needs_kernel
def test_auto_takes_the_compiled_kernel_and_the_environment_forces_a_path(monkeypatch, caplog):
    inputs = make_inputs(1, 2, 3, 4)
    args = [inputs[k] for k in NAMES[:5]]
    monkeypatch.delenv(ssm.SCAN_ENV, raising=False)
    ssm._logged.clear()
    with caplog.at_level(logging.INFO, logger="cxpmrg_lib.models.ssm"):
        auto = selective_scan(*args, D=inputs["D"])
        monkeypatch.setenv(ssm.SCAN_ENV, "torch")
        forced = selective_scan(*args, D=inputs["D"])
        assert ssm.scan_impl_name("cpu") == "fast"
        monkeypatch.setenv(ssm.SCAN_ENV, "compiled")
        assert ssm.scan_impl_name("cpu") == "compiled"
    assert [r.getMessage() for r in caplog.records] == ["selective scan: compiled CPU kernel",
                                                       "selective scan: pure-PyTorch path on cpu"]
    assert rel_err(auto, forced) < 1e-12
    monkeypatch.setenv(ssm.SCAN_ENV, "cuda")
    with pytest.raises(ValueError, match="CXPMRG_SCAN"):
        selective_scan(*args)


def test_without_a_compiler_one_log_line_and_the_same_results(monkeypatch, caplog):
    from cxpmrg_lib.models import ssm_build

    inputs = make_inputs(1, 2, 3, 4)
    args = [inputs[k] for k in NAMES[:5]]
    monkeypatch.delenv(ssm.SCAN_ENV, raising=False)
    monkeypatch.setattr(ssm_build, "_state", {})
    monkeypatch.setattr(ssm_build.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "c++-missing")
    ssm._logged.clear()
    with caplog.at_level(logging.INFO):
        out = selective_scan(*args, D=inputs["D"])
        selective_scan(*args, D=inputs["D"])
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "apt-get install build-essential" in m]) == 1, messages
    assert "selective scan: pure-PyTorch path on cpu" in messages
    assert rel_err(out, selective_scan(*args, D=inputs["D"], impl="reference")) < 1e-12
    assert ssm.scan_impl_name("cpu") == "fast"
    with pytest.raises(RuntimeError, match="build-essential"):
        selective_scan(*args, impl="compiled")


def test_cuda_dispatch_order_is_triton_then_mamba_ssm_then_pytorch(monkeypatch):
    import sys
    import types

    monkeypatch.delenv(ssm.SCAN_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "cxpmrg_lib.models.ssm_triton", None)     # absent: ImportError
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    assert ssm.scan_impl_name("cuda") == "fast"
    fake = types.ModuleType("cxpmrg_lib.models.ssm_triton")
    fake.selective_scan_triton = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "cxpmrg_lib.models.ssm_triton", fake)
    assert ssm.scan_impl_name("cuda") == "triton"


# ----------------------------------------------------------------------------- grouped scan (merged directions)

def _grouped_inputs(groups, batch, channels, state, length, dtype, seed=0):
    """Per-sequence A, D and bias and a scan order per sequence, as the merged mixer passes them; z once per b."""
    t = make_inputs(groups * batch, channels, state, length, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t["A"] = -torch.exp(torch.rand(groups * batch, channels, state, generator=g, dtype=dtype) * 2)
    t["D"] = torch.randn(groups * batch, channels, generator=g, dtype=dtype)
    t["delta_bias"] = torch.randn(groups * batch, channels, generator=g, dtype=dtype) * 0.1
    t["z"] = t["z"][:batch].clone()
    order = torch.stack([torch.randperm(length, generator=g) for _ in range(groups * batch)])
    return t, order


@needs_kernel
@pytest.mark.parametrize("groups,batch,length", [(4, 2, 70), (2, 3, 33), (1, 2, 9)])
def test_grouped_scan_is_the_mean_of_the_groups_bit_for_bit(groups, batch, length):
    """groups=G: every group reads the one z and the output is the groups' mean, exactly what the ungrouped scan
    with z repeated per group followed by torch's mean gives (float32, outputs and every gradient)."""
    t, order = _grouped_inputs(groups, batch, 20, 16, length, torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    out = ssm.selective_scan_compiled(*(leaves[k] for k in "u delta A B C".split()), D=leaves["D"], z=leaves["z"],
                                      delta_bias=leaves["delta_bias"], delta_softplus=True, order=order,
                                      groups=groups)
    assert out.shape == (batch, 20, length)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    z_rep = ref_leaves["z"].unsqueeze(0).expand(groups, -1, -1, -1).reshape(groups * batch, 20, length)
    ref = ssm.selective_scan_compiled(*(ref_leaves[k] for k in "u delta A B C".split()), D=ref_leaves["D"], z=z_rep,
                                      delta_bias=ref_leaves["delta_bias"], delta_softplus=True, order=order)
    ref = ref.view(groups, batch, 20, length).mean(0)
    assert torch.equal(out, ref)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    for k in NAMES:
        assert torch.equal(leaves[k].grad, ref_leaves[k].grad), k


@needs_kernel
def test_grouped_scan_gradcheck_float64():
    t, order = _grouped_inputs(2, 2, 3, 4, 40, torch.float64, seed=3)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    tensors = [t[k].clone().requires_grad_() for k in names]

    def f(*ts):
        a = dict(zip(names, ts))
        return ssm.selective_scan_compiled(a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
                                           delta_bias=a["delta_bias"], delta_softplus=True, order=order, groups=2)

    assert torch.autograd.gradcheck(f, tensors)


@needs_kernel
def test_grouped_scan_refuses_bad_groups_and_z():
    t, order = _grouped_inputs(2, 2, 4, 4, 8, torch.float32)
    args = [t[k] for k in "u delta A B C".split()]
    with pytest.raises(ValueError, match="divisor"):
        ssm.selective_scan_compiled(*args, z=t["z"], groups=3)
    with pytest.raises(ValueError, match="batch / groups"):
        ssm.selective_scan_compiled(*args, z=t["u"], groups=2)


@needs_kernel
def test_compiled_reads_B_and_C_through_strides_and_lays_grouped_output_channels_last():
    """B and C as column slices of one (batch, length, r + 2n) projection (the mixer's x_dbl) are read in place,
    with the results of contiguous copies; a channels-last u gives a grouped output whose transpose is contiguous."""
    groups, batch, d, n, length = 2, 3, 20, 8, 33
    t, order = _grouped_inputs(groups, batch, d, n, length, torch.float32, seed=5)
    wide = torch.randn(groups * batch, length, 4 + 2 * n)
    wide[..., 4:4 + n] = t["B"].transpose(1, 2)
    wide[..., 4 + n:] = t["C"].transpose(1, 2)
    u_cl = t["u"].transpose(1, 2).contiguous().transpose(1, 2)              # channels innermost
    results = []
    for B, C, u in ((wide[..., 4:4 + n].transpose(1, 2), wide[..., 4 + n:].transpose(1, 2), u_cl),
                    (t["B"].contiguous(), t["C"].contiguous(), t["u"].contiguous())):
        leaves = [x.detach().clone().requires_grad_() for x in (u, t["delta"], B, C, t["z"])]
        out = ssm.selective_scan_compiled(leaves[0], leaves[1], t["A"], leaves[2], leaves[3], D=t["D"], z=leaves[4],
                                          delta_bias=t["delta_bias"], delta_softplus=True, order=order, groups=groups)
        (out * out.detach().cos()).sum().backward()
        results.append((out, [x.grad for x in leaves]))
    (out1, g1), (out2, g2) = results
    assert out1.transpose(1, 2).is_contiguous()
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
