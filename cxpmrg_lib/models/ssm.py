"""Mamba-1 selective scan: a fast pure-PyTorch path, mamba-ssm's CUDA kernel, a reference.

All three compute `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` (real A,
input-dependent B and C, one group). The pure-PyTorch path is one custom autograd
Function: its forward runs the recurrence without autograd, one in-place `addcmul_` per
time step on time-major contiguous buffers, and its backward runs the adjoint recurrence
in reverse, so autograd never holds a graph of per-step ops. Time is cut into chunks of
about CHUNK_ELEMENTS state values so that the per-chunk buffers stay in cache; the
forward keeps exp(dt * A) for all steps (the exp is the costliest op) plus the state at
each chunk start, and the backward recomputes a chunk's states from its checkpoint.
The recurrence multiplies by the true per-step factors exp(dt * A), so no intermediate
is larger than the true states: no closed form with exp(-cumsum), nothing to overflow
on long sequences.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_fast"]

logger = logging.getLogger(__name__)

Impl = Literal["auto", "fast", "reference"]
IMPLS = ("auto", "fast", "reference")
CHUNK_ELEMENTS = 1 << 19  # elements of one (time, batch, channel, state) chunk buffer: ~2 MB in float32
_logged: set[str] = set()


def _log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length); got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    per_seq = A.dim() == 3
    if A.shape[-2:-1] != (channels,) or A.dim() not in (2, 3) or (per_seq and A.shape[0] != batch):
        raise ValueError(f"A must be (channels={channels}, state) or (batch={batch}, channels, state); "
                         f"got shape {tuple(A.shape)}")
    state = A.shape[-1]
    vec = (batch, channels) if per_seq else (channels,)
    expected = {"delta": (u.shape, delta), "B": ((batch, state, length), B), "C": ((batch, state, length), C),
                "D": (vec, D), "z": (u.shape, z), "delta_bias": (vec, delta_bias)}
    for name, (shape, t) in expected.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} to match u {tuple(u.shape)} and "
                             f"A {tuple(A.shape)}; got {tuple(t.shape)}")
    if A.is_complex() or B.is_complex() or C.is_complex():
        raise ValueError("only real A, B, C are supported (Mamba-1 with real state)")


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain sequential loop over time with autograd: slow, obviously right, for tests.

    Written the way mamba_ssm writes its own test oracle (`selective_scan_ref`): the
    discretised dA and dB*u for all steps first, then one state update and one einsum
    readout per step. Its backward costs O(L^2) (each step's slice of the all-steps
    tensors receives a full-size gradient): fine for tests, slow for long sequences.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.expand(u.shape[0], -1, -1)
    dA = torch.exp(torch.einsum("bdl,bdn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[-1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + D.to(compute)[..., None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype)


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
    return y, dA if keep else None, starts


def _scan_backward(dy, dt, dtu, A_nd, Bt, Ct, dA, starts, chunk: int, need):
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
    carry = None                         # dA[t1] * g[t1]: the adjoint flowing back into the chunk's end
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
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, keep: bool):
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
        y, dA, starts = _scan_forward(dt, dtu, A_nd, Bt, Ct, chunk, keep)
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
        return out

    @staticmethod
    def backward(ctx, dout):
        # backward() may be called inside an autocast region; the gradients stay in full precision
        with torch.autocast(dout.device.type, enabled=False):
            return _SelectiveScanFn._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
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
                                                      (need_dt, n_A, n_B, n_C))
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
                dCt.permute(1, 2, 0) if n_C else None, dD, dz, d_bias, None, None, None)


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Pure-PyTorch scan (any device): float64 stays float64, anything else computes in float32."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    per_step = u.shape[0] * u.shape[1] * A.shape[-1]
    chunk = max(1, min(u.shape[2], CHUNK_ELEMENTS // max(per_step, 1)))
    with torch.autocast(u.device.type, enabled=False):
        args = [t if t is None else t.to(compute) for t in (u, delta, A, B, C, D, z, delta_bias)]
        # what the backward needs is kept only when a backward can happen (not under no_grad)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        out = _SelectiveScanFn.apply(*args, bool(delta_softplus), chunk, keep)
    return out.to(dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                   impl: Impl = "auto"):
    """Mamba-1 selective scan with the semantics and signature of mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, channels, length); A: (channels, state); B, C: (batch, state, length);
    D, delta_bias: (channels,). Returns (batch, channels, length) in u's dtype.
    An extension of mamba_ssm's signature: A (batch, channels, state) with D and delta_bias
    (batch, channels) give each sequence its own parameters (several scan directions in one
    call; pure-PyTorch paths only).
    impl: "auto" uses mamba-ssm's CUDA kernel for CUDA tensors when it imports, else the fast
    PyTorch path; "fast" and "reference" force a path (tests, benchmarks).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if impl == "auto" and u.is_cuda and A.dim() == 2:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except ImportError as e:
            _log_once("cuda-fallback", f"tensors are on CUDA but mamba_ssm does not import ({e}); "
                      "using the pure-PyTorch selective scan (same results, slower)", logging.WARNING)
        else:
            _log_once("cuda", "selective scan: mamba-ssm CUDA kernel")
            return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _log_once(f"fast-{u.device.type}", f"selective scan: pure-PyTorch path on {u.device.type}")
    return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
