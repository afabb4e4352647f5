"""Mamba-1 selective scan: a compiled CPU kernel, a pure-PyTorch path, CUDA kernels, a reference.

All compute `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` (real A,
input-dependent B and C, one group), with two extensions: parameters per sequence (the
merged 4-way directions) and `order`, the order in which each sequence is scanned.

`selective_scan(impl="auto")` takes, on a CPU, the compiled kernel (csrc/selective_scan.cpp,
built once per machine by ssm_build; where it cannot be built, one log line says what to
install and the pure-PyTorch path runs, same results), and on CUDA cxpmrg_lib.models.ssm_triton,
then mamba-ssm, then the pure-PyTorch path. CXPMRG_SCAN=compiled|torch|reference forces a path.

Why C++ (torch.utils.cpp_extension, ninja, only ATen + torch/library.h: no pybind) rather than
numba: numba was weighed but not benchmarked here. It would add a dependency (numba + llvmlite,
which cap numpy releases) and a per-signature compile at each fresh cache, and it leaves the
vectorisation of exp and of the recurrence to LLVM's auto-vectoriser; C++ gives explicit vectors,
AVX-512's rounding and scaling instructions, and at::parallel_for, whose threads follow
torch.set_num_threads (the project's workers run 1 thread each). The measured figures are below.
The build costs ~20 s once per machine and checkout (cached in torch's extension directory, then ~0.1 s to load).

The kernel: threads over (batch x blocks of 16 channels, 8 without AVX-512); the channels of a block are
the lanes of one vector (GCC vector extensions: one AVX-512 or AVX2 register), so every state is an independent
lane-wise recurrence; the state count is a template parameter for 16 and 8 (the states stay in
registers), and exp is exp2 by a degree-6 polynomial with vrndscale/vscalef (no -ffast-math; the lane
types and math sit in csrc/lanes.h, shared with the block's compiled RMSNorm and gate, fused_ops). A block
first transposes its channels' inputs into time-major lane vectors (16x16 register transposes; a
channels-last input, as the merged mixer passes it, is read directly), the output is written in u's
layout. The forward keeps a state checkpoint every 32 steps (not the per-step exp(dt * A) the pure
path keeps: 0.11-0.17 of its peak memory); the backward recomputes a chunk's states and factors into a
block-local buffer that stays in cache, runs the adjoint back through it, and sums the contractions
over channels (dB, dC) with a shuffle tree, adding into one row per sequence when a thread runs all
of a sequence's blocks. It reads u, delta, z, B, C through strides and `order` (no copies into scan
order; B and C may be column slices of the x projection's output). With `groups` (the merged directions
of a 4-way mixer) one thread runs a block's G directions in order, every one gated by the same z, and
writes their mean (channels innermost when u's are); the backward reads the mean's gradient the same
way and sums the groups' dz in group order (with the same bits as the stacked mean and torch's sum).
`mixer_merged` calls the ops directly, with the mixer's conv and projections, as one autograd node. Forward + backward at B8 D192 N16 L196 (`make bench`, medians of interleaved rounds; the
machine's noise is about +-15%; an AVX-512 Xeon, December 2026): 1 thread 6.2 ms against 35.1 ms
for the pure path (5.7x), 343 ms for mambapy (55x) and 1.1 s for the sequential reference; 2 threads
3.6 ms (6.2x the pure path, 43x mambapy); at L 784, 7.7x the pure path at 1 thread. Without AVX-512 the lanes are one AVX2 register,
8 channels a block (the state vectors of a 16-channel block, two registers each, spilled on a 16-register
machine): on an AVX2-only AMD EPYC, the same B8 D192 N16 L196 forward + backward takes 20 ms at 1 thread
and 13 ms at 2 (80 and 39 ms with the 16-lane vectors; the tiny 4-way encoder's training step at batch 16,
128 px: 0.58 s against 1.37 s at 1 thread, 0.39 s against 0.83 s at 2). Both builds match the reference
to 2e-7 (outputs) and 6e-7 (gradients).

The pure-PyTorch path is one custom autograd
Function: its forward runs the recurrence without autograd, one in-place `addcmul_` per
time step on time-major contiguous buffers, and its backward runs the adjoint recurrence
in reverse, so autograd never holds a graph of per-step ops. Time is cut into chunks of
about CHUNK_ELEMENTS state values so that the per-chunk buffers stay in cache; the
forward keeps exp(dt * A) for all steps (the exp is the costliest op) plus the state at
each chunk start, and the backward recomputes a chunk's states from its checkpoint.
Both multiply by the true per-step factors exp(dt * A), so no intermediate
is larger than the true states: no closed form with exp(-cumsum), nothing to overflow
on long sequences.
"""
from __future__ import annotations

import logging
import os
from typing import Literal

import torch
import torch.nn.functional as F

from cxpmrg_lib.models.ssm_ref import _check_shapes, selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_fast", "selective_scan_compiled",
           "compiled_available", "scan_impl_name", "take_scan_impls", "record_scan_impl", "SCAN_ENV"]

logger = logging.getLogger(__name__)

Impl = Literal["auto", "compiled", "fast", "reference"]
IMPLS = ("auto", "compiled", "fast", "reference")
SCAN_ENV = "CXPMRG_SCAN"   # auto | compiled | torch | reference: forces the path of impl="auto"
CHUNK_ELEMENTS = 1 << 19  # elements of one (time, batch, channel, state) chunk buffer: ~2 MB in float32
_logged: set[str] = set()
_ran: set[str] = set()     # the paths selective_scan took since take_scan_impls() last asked (run summaries)


def _log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


def _chunks(length: int, step: int):
    for t0 in range(0, length, step):
        yield t0, min(t0 + step, length)


def _chunk_inputs(dt, dtu, A_nd, Bt, dA, hs, with_dA: bool = True) -> None:
    """hs = dt * u * B (m, b, n, d) of one chunk, and first dA = exp(dt * A) if asked.

    dt * A goes to hs (a small buffer that stays in cache) and exp writes dA once: dA is a
    slice of the large all-steps buffer, and writing it twice costs a memory round trip.
    """
    if with_dA:
        torch.mul(dt[:, :, None, :], A_nd, out=hs)
        torch.exp(hs, out=dA)
    torch.mul(Bt[:, :, :, None], dtu[:, :, None, :], out=hs)


def _scan_forward(dt, dtu, A_nd, Bt, Ct, chunk: int, keep: bool):
    """y (L, b, d); with `keep`, also dA for all steps and the state entering each chunk.

    Keeping dA spares the backward the exp (the costliest op); the states themselves are
    cheap to recompute from the chunk checkpoints, so they are not kept.
    """
    length, batch, channels = dt.shape
    state = A_nd.shape[-2]
    bounds = list(_chunks(length, chunk))
    dA = dt.new_empty(length if keep else chunk, batch, state, channels)
    hs = dt.new_empty(chunk, batch, state, channels)
    starts = dt.new_empty(len(bounds), batch, state, channels) if keep else None
    y = dt.new_empty(length, batch, channels)
    prev = None
    for ci, (t0, t1) in enumerate(bounds):
        m, k = t1 - t0, (t1 - t0) * batch
        if prev is not None:
            if keep:
                prev = starts[ci].copy_(prev)
            else:
                prev = prev.clone()
        dA_c, hs_c = dA[t0:t1] if keep else dA[:m], hs[:m]
        _chunk_inputs(dt[t0:t1], dtu[t0:t1], A_nd, Bt[t0:t1], dA_c, hs_c)
        h, a = hs_c.unbind(0), dA_c.unbind(0)
        if prev is not None:
            h[0].addcmul_(a[0], prev)
        for t in range(1, m):
            h[t].addcmul_(a[t], h[t - 1])
        torch.bmm(Ct[t0:t1].view(k, 1, state), hs[:m].view(k, state, channels), out=y[t0:t1].view(k, 1, channels))
        prev = hs[m - 1]
    return y, dA if keep else None, starts, prev


def _scan_backward(dy, dt, dtu, A_nd, Bt, Ct, dA, starts, chunk: int, need, dlast=None):
    """Adjoint recurrence in reverse, chunk by chunk. `need` = flags for (d_dt via A, dA, dB, dC).

    g[t] = dL/dh[t] = C[t] dy[t] + dA[t+1] g[t+1]; then dB, dC, d(dt*u) are contractions
    of g or h, and x = g * dA * h[t-1] = dL/d(dt*A) gives the dt and A gradients.
    """
    need_dt, need_A, need_B, need_C = need
    length, batch, channels = dt.shape
    state = A_nd.shape[-2]
    hs = dt.new_empty(chunk, batch, state, channels)
    g = dt.new_empty(chunk, batch, state, channels)
    x = dt.new_empty(chunk, batch, state, channels)
    carry = dlast                        # dA[t1] * g[t1]: the adjoint flowing back into the chunk's end
    d_dtu = torch.empty_like(dt)
    d_dt = torch.empty_like(dt) if need_dt else None
    dB = torch.empty_like(Bt) if need_B else None
    dC = torch.empty_like(Ct) if need_C else None
    dA_param = torch.zeros_like(A_nd) if need_A else None
    bounds = list(_chunks(length, chunk))
    for ci in range(len(bounds) - 1, -1, -1):
        t0, t1 = bounds[ci]
        m, k = t1 - t0, (t1 - t0) * batch
        g_c, x_c, hs_c, dA_c = g[:m], x[:m], hs[:m], dA[t0:t1]
        h_start = starts[ci] if ci > 0 else None
        _chunk_inputs(dt[t0:t1], dtu[t0:t1], A_nd, Bt[t0:t1], dA_c, hs_c, with_dA=False)
        dy_c = dy[t0:t1]
        torch.mul(Ct[t0:t1, :, :, None], dy_c[:, :, None, :], out=g_c)
        h, gs, a = hs_c.unbind(0), g_c.unbind(0), dA_c.unbind(0)
        if h_start is not None:
            h[0].addcmul_(a[0], h_start)
        if carry is not None:
            gs[m - 1].add_(carry)
        # the states' recomputation (forward in time) and the adjoint (backward in time) are
        # independent: one foreach call advances both, halving the per-step dispatches
        for j in range(1, m):
            torch._foreach_addcmul_((h[j], gs[m - 1 - j]), (a[j], a[m - j]), (h[j - 1], gs[m - j]))
        if need_C:
            torch.bmm(dy_c.view(k, 1, channels), hs_c.view(k, state, channels).transpose(1, 2),
                      out=dC[t0:t1].view(k, 1, state))
        g_k = g_c.view(k, state, channels)
        torch.bmm(Bt[t0:t1].view(k, 1, state), g_k, out=d_dtu[t0:t1].view(k, 1, channels))
        if need_B:
            torch.bmm(dtu[t0:t1].view(k, 1, channels), g_k.transpose(1, 2), out=dB[t0:t1].view(k, 1, state))
        if not (need_dt or need_A):
            carry = a[0] * gs[0] if ci > 0 else None
            continue
        torch.mul(g_c, dA_c, out=x_c)
        carry = x_c[0].clone() if ci > 0 else None
        if h_start is None:
            x_c[0].zero_()
        else:
            x_c[0].mul_(h_start)
        if m > 1:
            x_c[1:].mul_(hs_c[:-1])
        if need_dt:
            torch.mul(x_c, A_nd, out=g_c)
            torch.sum(g_c, dim=2, out=d_dt[t0:t1])
        if need_A:
            x_c.mul_(dt[t0:t1, :, None, :])
            if A_nd.dim() == 3:          # one A per sequence: reduce over time only
                dA_param += x_c.sum(0)
            else:
                dA_param += x_c.view(k, state * channels).sum(0).view(state, channels)
    return d_dtu, d_dt, dA_param, dB, dC


class _SelectiveScanFn(torch.autograd.Function):
    """The whole scan (bias, softplus, recurrence, D, z gate) as one autograd node.

    Internally time-major, states laid out (L, b, n, d) with channels innermost: then every
    contraction over n or d is a fast batched vector-matrix product. All inputs arrive in
    one float dtype (the caller casts).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, keep: bool,
                want_last: bool):
        ut = u.permute(2, 0, 1).contiguous()
        xt = torch.empty_like(ut)                         # delta (+ bias), time-major
        if delta_bias is None:
            xt.copy_(delta.permute(2, 0, 1))
        else:
            torch.add(delta.permute(2, 0, 1), delta_bias, out=xt)
        dt = F.softplus(xt) if delta_softplus else xt
        dtu = dt * ut
        Bt = B.permute(2, 0, 1).contiguous()
        Ct = C.permute(2, 0, 1).contiguous()
        A_nd = A.transpose(-1, -2).contiguous()         # (n, d), or (b, n, d) with one A per sequence
        y, dA, starts, h_last = _scan_forward(dt, dtu, A_nd, Bt, Ct, chunk, keep)
        last = h_last.transpose(1, 2).contiguous() if want_last else u.new_empty(0)   # (b, d, n)
        if not want_last:
            ctx.mark_non_differentiable(last)
        if D is not None:
            y.addcmul_(ut, D)
        out = torch.empty_like(u)
        silu_z = None
        if z is None:
            out.copy_(y.permute(1, 2, 0))
        else:
            silu_z = F.silu(z)
            torch.mul(y.permute(1, 2, 0), silu_z, out=out)
        if keep:
            ctx.save_for_backward(ut, xt if delta_softplus else None, dt, dtu, A_nd, Bt, Ct, D, z, silu_z,
                                  y if z is not None else None, dA, starts)
            ctx.chunk = chunk
            ctx.has_bias = delta_bias is not None
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        # backward() may be called inside an autocast region; the gradients stay in full precision
        with torch.autocast(dout.device.type, enabled=False):
            return _SelectiveScanFn._backward(ctx, dout, dlast)

    @staticmethod
    def _backward(ctx, dout, dlast):
        ut, xt, dt, dtu, A_nd, Bt, Ct, D, z, silu_z, y, dA, starts = ctx.saved_tensors
        n_u, n_delta, n_A, n_B, n_C, n_D, n_z, n_bias = ctx.needs_input_grad[:8]
        dz = None
        dyt = torch.empty_like(dt)
        if z is None:
            dyt.copy_(dout.permute(2, 0, 1))
        else:
            torch.mul(dout.permute(2, 0, 1), silu_z.permute(2, 0, 1), out=dyt)
            if n_z:
                dz = torch.ops.aten.silu_backward(dout * y.permute(1, 2, 0), z)
        need_dt = n_delta or (n_bias and ctx.has_bias)
        d_dtu, d_dt, dA_nd, dBt, dCt = _scan_backward(dyt, dt, dtu, A_nd, Bt, Ct, dA, starts, ctx.chunk,
                                                      (need_dt, n_A, n_B, n_C),
                                                      None if dlast is None or dlast.numel() == 0
                                                      else dlast.transpose(1, 2).to(dt.dtype))
        du = dD = d_delta = d_bias = None
        if n_u:
            du = d_dtu * dt
            if D is not None:
                du.addcmul_(dyt, D)
            du = du.permute(1, 2, 0)
        per_seq = A_nd.dim() == 3                       # A, D and the bias given per sequence
        if n_D:
            dD = (dyt * ut).sum(0 if per_seq else (0, 1))
        if need_dt:
            d_dt.addcmul_(d_dtu, ut)
            if xt is not None:
                d_dt = torch.ops.aten.softplus_backward(d_dt, xt, 1.0, 20.0)
            d_delta = d_dt.permute(1, 2, 0) if n_delta else None
            d_bias = d_dt.sum(0 if per_seq else (0, 1)) if n_bias and ctx.has_bias else None
        return (du, d_delta, dA_nd.transpose(-1, -2) if n_A else None, dBt.permute(1, 2, 0) if n_B else None,
                dCt.permute(1, 2, 0) if n_C else None, dD, dz, d_bias, None, None, None, None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """Pure-PyTorch scan (any device): float64 stays float64, anything else computes in float32."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    compute = _compute_dtype(dtype)
    per_step = u.shape[0] * u.shape[1] * A.shape[-1]
    chunk = max(1, min(u.shape[2], CHUNK_ELEMENTS // max(per_step, 1)))
    with torch.autocast(u.device.type, enabled=False):
        args = [t if t is None else t.to(compute) for t in (u, delta, A, B, C, D, z, delta_bias)]
        # what the backward needs is kept only when a backward can happen (not under no_grad)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        out, last = _SelectiveScanFn.apply(*args, bool(delta_softplus), chunk, keep, bool(return_last_state))
    return (out.to(dtype), last.to(dtype)) if return_last_state else out.to(dtype)


class _CompiledScanFn(torch.autograd.Function):
    """The compiled kernel (csrc/selective_scan.cpp) as one autograd node: it keeps the inputs and
    a state checkpoint every 32 steps; its backward recomputes the states chunk by chunk."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, order, delta_softplus: bool, keep: bool,
                want_last: bool, groups: int = 1):
        ops = _kernel()
        out, last, ckpt = ops.scan_fwd(u, delta, A, B, C, D, z, delta_bias, order, delta_softplus, keep, want_last,
                                       groups)
        ctx.groups = groups
        if not want_last:
            ctx.mark_non_differentiable(last)
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, order, ckpt)
            ctx.softplus = delta_softplus
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, order, ckpt = ctx.saved_tensors
        dlast = dlast if dlast is not None and dlast.numel() else None
        with torch.autocast(dout.device.type, enabled=False):
            grads = _kernel().scan_bwd(dout.to(u.dtype), dlast, u, delta, A, B, C, D, z, delta_bias, order, ckpt,
                                       ctx.softplus, ctx.groups, None)
        need = ctx.needs_input_grad
        out = [g if need[i] and g.numel() else None for i, g in enumerate(grads)]
        return (*out, None, None, None, None, None)


def selective_scan_compiled(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, *, order=None, groups: int = 1):
    """The compiled CPU kernel; raises RuntimeError (saying what to install) when it cannot be built.

    `groups` G > 1 (the merged directions of a Vision Mamba mixer): the batch is G groups of
    batch / G sequences, sequence g * (batch / G) + b gated by z[b] (z is (batch / G, dim, L)), and the
    output is the groups' mean, (batch / G, dim, L): `out.view(G, -1, dim, L).mean(0)` of the ungrouped
    scan with z repeated for every group, bit for bit, without the repeated z or the stacked outputs.
    """
    groups = int(groups)
    if groups < 1 or u.shape[0] % groups:
        raise ValueError(f"groups must be a positive divisor of the batch {u.shape[0]}; got {groups}")
    if groups > 1 and z is not None and tuple(z.shape) != (u.shape[0] // groups, *u.shape[1:]):
        raise ValueError(f"with groups={groups}, z must be (batch / groups, dim, L) = "
                         f"{(u.shape[0] // groups, *u.shape[1:])}; got {tuple(z.shape)}")
    _check_shapes(u, delta, A, B, C, D, z if groups == 1 else None, delta_bias, order)
    if _kernel() is None:
        from cxpmrg_lib.models.ssm_build import kernel_problem

        raise RuntimeError(f"the compiled selective scan is unavailable: {kernel_problem() or 'its build failed'}"
                           " (see the log); use impl='fast' or CXPMRG_SCAN=torch")
    if u.device.type != "cpu":
        raise ValueError(f"the compiled selective scan runs on CPU tensors; got {u.device}")
    dtype = u.dtype
    compute = _compute_dtype(dtype)
    with torch.autocast(u.device.type, enabled=False):
        args = [t if t is None else t.to(compute) for t in (u, delta, A, B, C, D, z, delta_bias)]
        for i in (2, 5, 7):                          # A, D, bias: small, read once per block
            if args[i] is not None:
                args[i] = args[i].contiguous()
        order = None if order is None else order.to(torch.long).expand(u.shape[0], -1).contiguous()
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        record_scan_impl("compiled")
        out, last = _CompiledScanFn.apply(*args, order, bool(delta_softplus), keep, bool(return_last_state), groups)
    return (out.to(dtype), last.to(dtype)) if return_last_state else out.to(dtype)


def _kernel():
    from cxpmrg_lib.models.ssm_build import load_kernel

    return load_kernel()


def compiled_available() -> bool:
    """Whether the compiled CPU kernel is built (building it now if needed)."""
    return _kernel() is not None


def _apply_order(fn, order, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Scan sequence b in the order order[b] of its stored positions through gathers (the paths
    without native `order`): inputs gathered into scan order, the output gathered back."""
    if order is None:
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    order = order.to(device=u.device, dtype=torch.long).expand(u.shape[0], -1)
    inverse = torch.argsort(order, dim=-1)

    def take(t, idx):
        return None if t is None else t.gather(2, idx[:, None, :].expand(-1, t.shape[1], -1))

    res = fn(take(u, order), take(delta, order), A, take(B, order), take(C, order), D, take(z, order), delta_bias,
             delta_softplus, return_last_state)
    out, last = res if return_last_state else (res, None)
    out = take(out, inverse)
    return (out, last) if return_last_state else out


def scan_impl_name(device: str | torch.device = "cpu") -> str:
    """Which path `selective_scan(impl="auto")` takes for tensors on `device` (recorded in run summaries)."""
    device = torch.device(device)
    forced = _forced_impl()
    if forced is not None:
        return forced
    if device.type == "cuda":
        for name, probe in (("triton", _triton_scan), ("mamba-ssm", _mamba_ssm_scan)):
            if probe() is not None:
                return name
        return "fast"
    return "compiled" if device.type == "cpu" and compiled_available() else "fast"


def record_scan_impl(name: str) -> None:
    """Note that the scan ran on path `name` (for `take_scan_impls`): callers of the kernels themselves
    (`selective_scan_compiled`, `mixer_merged`) say so, as `selective_scan`'s dispatch does."""
    _ran.add(name)


def take_scan_impls() -> str:
    """The paths the scan took in this process since the last call ("compiled", "pytorch", "triton",
    "mamba-ssm", "reference"; comma-joined, "none" if no scan ran), and start a new record: a stage
    run's summary says which scan its training used."""
    names = ", ".join(sorted(_ran)) or "none"
    _ran.clear()
    return names


def _forced_impl() -> str | None:
    value = os.environ.get(SCAN_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    value = {"torch": "fast", "pytorch": "fast"}.get(value, value)
    if value not in ("compiled", "fast", "reference"):
        raise ValueError(f"{SCAN_ENV}={os.environ[SCAN_ENV]!r}: use auto, compiled, torch (the pure-PyTorch path) "
                         "or reference")
    return value


def _triton_scan():
    try:
        from cxpmrg_lib.models.ssm_triton import selective_scan_triton
    except ImportError:
        return None
    return selective_scan_triton


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, order=None, impl: Impl = "auto"):
    """Mamba-1 selective scan with the semantics and signature of mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, channels, length); A: (channels, state); B, C: (batch, state, length);
    D, delta_bias: (channels,). Returns (batch, channels, length) in u's dtype, and with
    `return_last_state` also the final state (batch, channels, state), as mamba_ssm does.
    Extensions of mamba_ssm's signature: A (batch, channels, state) with D and delta_bias
    (batch, channels) give each sequence its own parameters (several scan directions in one
    call); `order` (batch, length) or (length,) int64 scans sequence b in the order
    order[b, 0], order[b, 1], ... of its stored positions, every (.., length) tensor (the
    output too) staying in stored order (reversed and column-major directions without copies
    on the compiled path).
    impl: "auto" takes, for CUDA tensors, cxpmrg_lib.models.ssm_triton, then mamba-ssm, then the
    pure-PyTorch path; for CPU tensors the compiled kernel, else (no compiler) the pure-PyTorch
    path. "compiled", "fast" (pure PyTorch) and "reference" force a path, as does the environment
    variable CXPMRG_SCAN=compiled|torch|reference for impl="auto".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, order)
    if impl == "auto":
        impl = _forced_impl() or "auto"
    if impl == "reference":
        _ran.add("reference")
        return _apply_order(selective_scan_reference, order, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state)
    if impl == "compiled" or (impl == "auto" and u.device.type == "cpu" and compiled_available()):
        _log_once("compiled", "selective scan: compiled CPU kernel")
        _ran.add("compiled")
        return selective_scan_compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                       order=order)
    if impl == "auto" and u.is_cuda:
        triton = _triton_scan()
        if triton is not None:
            _log_once("triton", "selective scan: Triton kernel (cxpmrg_lib.models.ssm_triton)")
            _ran.add("triton")
            return _apply_order(triton, order, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)
        mamba = _mamba_ssm_scan()
        if mamba is not None and A.dim() == 2:
            _log_once("cuda", "selective scan: mamba-ssm CUDA kernel")
            _ran.add("mamba-ssm")
            return _apply_order(mamba, order, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)
        _log_once("cuda-fallback", "tensors are on CUDA but neither cxpmrg_lib.models.ssm_triton nor mamba_ssm "
                  "(for this call) is available; using the pure-PyTorch selective scan (same results, slower)",
                  logging.WARNING)
    _log_once(f"fast-{u.device.type}", f"selective scan: pure-PyTorch path on {u.device.type}")
    _ran.add("pytorch")
    return _apply_order(selective_scan_fast, order, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        return_last_state)
