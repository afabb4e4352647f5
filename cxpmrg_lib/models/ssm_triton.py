"""Mamba-1 selective scan as Triton kernels (forward and backward): a CUDA path with no extension build.

Same semantics as `cxpmrg_lib.models.ssm.selective_scan_reference` and mamba_ssm's
`selective_scan_fn` (real A, one group of B and C), and the same extension as the
pure-PyTorch path: A (batch, channels, state) with D and delta_bias (batch, channels)
give each sequence its own parameters. Everything is computed in float32.

Layout of the work: one program per (sequence, block of channels) walks the sequence in
time, holding the (channels, state) tile of states in registers; every step is one
exp, two multiply-adds and a reduction over the state. The forward keeps the state
entering each chunk of CHUNK steps (when a backward can follow); the backward walks the
chunks in reverse, recomputes a chunk's states from its checkpoint into a scratch
buffer, then runs the adjoint recurrence g[t] = C[t] dy[t] + exp(dt[t+1] A) g[t+1]
backwards through the chunk. Gradients of B and C (summed over channels) are written per
channel block and summed afterwards, so the result does not depend on atomics' order.

This module imports only where Triton does: `from cxpmrg_lib.models.ssm_triton import
selective_scan_triton` raises ImportError without it, so callers guard that import.
On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before triton
is first imported), which is how the tests check them without a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the module's contract: no Triton, no import
    raise ImportError(f"the Triton selective scan needs the `triton` package ({e}); "
                      "install it with `pip install -e '.[cuda]'`") from e

from cxpmrg_lib.models.ssm_ref import _check_shapes

__all__ = ["selective_scan_triton", "interpreter_active", "CHUNK"]

logger = logging.getLogger(__name__)

CHUNK = 64  # time steps between two forward checkpoints; the backward's scratch holds CHUNK + 1 states


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) with mamba's threshold; log1p by its series where exp(x) is tiny
    e = tl.exp(tl.minimum(x, 20.0))
    log1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, ckpt_ptr, last_ptr,
    channels, length, state, n_chunks,
    s_xb, s_xd, s_xt,            # strides of u, delta, z and out (one layout)
    s_Ab, s_Ad, s_An,            # A; s_Ab = 0 when A is shared by all sequences
    s_Bb, s_Bn, s_Bt,            # strides of B and C (one layout)
    s_vb,                        # batch stride of D and delta_bias (0 when shared); channels contiguous
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_CKPT: tl.constexpr, SAVE_LAST: tl.constexpr,
    CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_dn = mask_d[:, None] & (offs_n < state)[None, :]
    A = tl.load(A_ptr + b * s_Ab + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + b * s_vb + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * s_vb + offs_d, mask=mask_d, other=0.0)
    x_row = b * s_xb + offs_d * s_xd
    bc_row = b * s_Bb + offs_n * s_Bn
    tile = offs_d[:, None] * state + offs_n[None, :]          # (d, n) in a contiguous (channels, state) block
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, n_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + (b * n_chunks + c) * channels * state + tile, h, mask=mask_dn)
        t0 = c * CHUNK_T
        for j in range(0, tl.minimum(CHUNK_T, length - t0)):
            t = t0 + j
            u = tl.load(u_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            dt = tl.load(delta_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc_row + t * s_Bt, mask=offs_n < state, other=0.0)
            Ct = tl.load(C_ptr + bc_row + t * s_Bt, mask=offs_n < state, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
                y = y * zt * _sigmoid(zt)
            tl.store(out_ptr + x_row + t * s_xt, y, mask=mask_d)
    if SAVE_LAST:
        tl.store(last_ptr + b * channels * state + tile, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    channels, length, state, n_chunks, n_dblocks,
    s_xb, s_xd, s_xt, s_Ab, s_Ad, s_An, s_Bb, s_Bn, s_Bt, s_vb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    pd = tl.program_id(1)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_n = offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + b * s_Ab + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + b * s_vb + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * s_vb + offs_d, mask=mask_d, other=0.0)
    x_row = b * s_xb + offs_d * s_xd
    bc_row = b * s_Bb + offs_n * s_Bn
    tile = offs_d[:, None] * state + offs_n[None, :]
    # this program's scratch: CHUNK_T + 1 states, [0] = the state entering the chunk
    scratch = scratch_ptr + (b * n_dblocks + pd) * (CHUNK_T + 1) * BLOCK_D * BLOCK_N
    s_tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    # the B/C gradients of this channel block: (batch, n_dblocks, length, state), summed over blocks later
    part_row = (b * n_dblocks + pd) * length * state + offs_n
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)    # exp(dt[t+1] A) * g[t+1]
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK_T
        m = tl.minimum(CHUNK_T, length - t0)
        h = tl.load(ckpt_ptr + (b * n_chunks + c) * channels * state + tile, mask=mask_dn, other=0.0)
        tl.store(scratch + s_tile, h)
        for j in range(0, m):                                   # recompute the chunk's states
            t = t0 + j
            u = tl.load(u_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            dt = tl.load(delta_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc_row + t * s_Bt, mask=mask_n, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (j + 1) * BLOCK_D * BLOCK_N + s_tile, h)
        tl.debug_barrier()
        for j in range(0, m):                                   # the adjoint, backwards through the chunk
            jj = m - 1 - j
            t = t0 + jj
            u = tl.load(u_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            x = tl.load(delta_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            if HAS_BIAS:
                x += bias
            if SOFTPLUS:
                dt = _softplus(x)
            else:
                dt = x
            Bt = tl.load(B_ptr + bc_row + t * s_Bt, mask=mask_n, other=0.0)
            Ct = tl.load(C_ptr + bc_row + t * s_Bt, mask=mask_n, other=0.0)
            dout = tl.load(dout_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
            h_t = tl.load(scratch + (jj + 1) * BLOCK_D * BLOCK_N + s_tile)
            h_prev = tl.load(scratch + jj * BLOCK_D * BLOCK_N + s_tile)
            if HAS_Z:
                zt = tl.load(z_ptr + x_row + t * s_xt, mask=mask_d, other=0.0)
                sig = _sigmoid(zt)
                y = tl.sum(h_t * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                tl.store(dz_ptr + x_row + t * s_xt, dout * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_d)
                dy = dout * zt * sig
            else:
                dy = dout
            g = carry + dy[:, None] * Ct[None, :]
            tl.store(dC_ptr + part_row + t * state, tl.sum(dy[:, None] * h_t, axis=0), mask=mask_n)
            dtu = dt * u
            tl.store(dB_ptr + part_row + t * state, tl.sum(g * dtu[:, None], axis=0), mask=mask_n)
            d_dtu = tl.sum(g * Bt[None, :], axis=1)
            dA_t = tl.exp(dt[:, None] * A)
            gx = g * dA_t * h_prev                              # dL/d(dt * A)
            dA_acc += gx * dt[:, None]
            d_dt = d_dtu * u + tl.sum(gx * A, axis=1)
            du = d_dtu * dt
            if HAS_D:
                du += dy * Dv
                dD_acc += dy * u
            if SOFTPLUS:
                d_dt = d_dt * _sigmoid(x)
            dbias_acc += d_dt
            tl.store(du_ptr + x_row + t * s_xt, du, mask=mask_d)
            tl.store(ddelta_ptr + x_row + t * s_xt, d_dt, mask=mask_d)
            carry = dA_t * g
        tl.debug_barrier()
    tl.store(dA_ptr + b * channels * state + tile, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + b * channels + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * channels + offs_d, dbias_acc, mask=mask_d)


def _blocks(batch: int, channels: int, state: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps): narrower channel blocks until there are programs for every SM."""
    block_n = max(2, triton.next_power_of_2(state))
    block_d = min(64, max(2, triton.next_power_of_2(channels)))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while block_d > 8 and batch * triton.cdiv(channels, block_d) < 2 * sms:
            block_d //= 2
    num_warps = max(1, min(8, block_d * block_n // 128))
    return block_d, block_n, num_warps


def _time_minor(t: torch.Tensor) -> torch.Tensor:
    """(b, x, L) float32 laid out (b, L, x) in memory: one time step's row of x is contiguous."""
    return t.to(torch.float32).transpose(1, 2).contiguous().transpose(1, 2)


class _SelectiveScanTritonFn(torch.autograd.Function):
    """The whole scan as one autograd node; inputs arrive float32, prepared by `selective_scan_triton`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                keep: bool):
        batch, channels, length = u.shape
        state = A.shape[-1]
        block_d, block_n, num_warps = _blocks(batch, channels, state, u.device)
        n_chunks = triton.cdiv(length, CHUNK)
        n_dblocks = triton.cdiv(channels, block_d)
        # the largest buffer a kernel indexes (B/C gradients per channel block, checkpoints, scratch)
        biggest = max(u.numel(), batch * n_dblocks * length * block_n, batch * n_chunks * channels * state,
                      batch * n_dblocks * (CHUNK + 1) * block_d * block_n)
        if biggest >= 2 ** 31:
            raise ValueError(f"inputs of shape u {tuple(u.shape)}, A {tuple(A.shape)} are too large for the "
                             "kernels' 32-bit offsets; split the batch")
        out = torch.empty_like(u)                               # same (time-minor) strides as u
        ckpt = u.new_empty(batch, n_chunks, channels, state) if keep else u.new_empty(1)
        last = u.new_empty(batch, channels, state) if return_last_state else u.new_empty(1)
        dummy = u.new_empty(1)
        s_Ab = A.stride(0) if A.dim() == 3 else 0
        s_vb = channels if A.dim() == 3 else 0
        grid = (batch, n_dblocks)
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, ckpt, last,
            channels, length, state, n_chunks,
            u.stride(0), u.stride(1), u.stride(2), s_Ab, A.stride(-2), A.stride(-1),
            B.stride(0), B.stride(1), B.stride(2), s_vb,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), SAVE_CKPT=keep, SAVE_LAST=bool(return_last_state),
            CHUNK_T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        )
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.softplus = bool(delta_softplus)
            ctx.blocks = (block_d, block_n, num_warps)
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *_ignored_last_state_grad):
        with torch.cuda.device(dout.device) if dout.is_cuda else contextlib.nullcontext():
            return _SelectiveScanTritonFn._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        batch, channels, length = u.shape
        state = A.shape[-1]
        block_d, block_n, num_warps = ctx.blocks
        n_chunks = ckpt.shape[1]
        n_dblocks = triton.cdiv(channels, block_d)
        per_seq = A.dim() == 3
        dout = _time_minor(dout)
        if dout.stride() != u.stride():
            raise RuntimeError(f"internal: dout strides {dout.stride()} differ from u's {u.stride()}")
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA = u.new_empty(batch, channels, state)
        dB_part = u.new_empty(batch, n_dblocks, length, state)
        dC_part = u.new_empty(batch, n_dblocks, length, state)
        dD = u.new_empty(batch, channels) if D is not None else None
        dbias = u.new_empty(batch, channels) if delta_bias is not None else None
        scratch = u.new_empty(batch * n_dblocks * (CHUNK + 1) * block_d * block_n)
        dummy = u.new_empty(1)
        _scan_bwd_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, dout, ckpt, scratch,
            du, ddelta, dz if dz is not None else dummy, dA, dB_part, dC_part,
            dD if dD is not None else dummy, dbias if dbias is not None else dummy,
            channels, length, state, n_chunks, n_dblocks,
            u.stride(0), u.stride(1), u.stride(2), A.stride(0) if per_seq else 0, A.stride(-2), A.stride(-1),
            B.stride(0), B.stride(1), B.stride(2), channels if per_seq else 0,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            CHUNK_T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        )
        if not per_seq:                                         # shared parameters: sum over sequences
            dA = dA.sum(0)
            dD = dD.sum(0) if dD is not None else None
            dbias = dbias.sum(0) if dbias is not None else None
        dB = dB_part.sum(1).transpose(1, 2)
        dC = dC_part.sum(1).transpose(1, 2)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Mamba-1 selective scan on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), forward and backward.

    u, delta, z: (batch, channels, length); A: (channels, state) or (batch, channels, state);
    B, C: (batch, state, length); D, delta_bias: (channels,), or (batch, channels) with a per-sequence A.
    Returns out (batch, channels, length) in u's dtype, computed in float32, and with
    `return_last_state` also the final state (batch, channels, state) in float32 (no gradient flows
    through it, as in mamba_ssm).
    """

    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")
    if u.device.type != "cuda" and not interpreter_active():
        raise ValueError(f"the Triton selective scan runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                         f"got tensors on {u.device}")
    if u.shape[2] == 0:
        raise ValueError("u has length 0: nothing to scan")
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        args = [_time_minor(u), _time_minor(delta), A.to(torch.float32).contiguous(), _time_minor(B),
                _time_minor(C)]
        args += [None if D is None else D.to(torch.float32).contiguous(),
                 None if z is None else _time_minor(z),
                 None if delta_bias is None else delta_bias.to(torch.float32).contiguous()]
        # the checkpoints for the backward are kept only when a backward can happen (not under no_grad)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():   # kernels launch there
            result = _SelectiveScanTritonFn.apply(*args, bool(delta_softplus), bool(return_last_state), keep)
    if return_last_state:
        out, last = result
        return out.to(dtype), last
    return result.to(dtype)
