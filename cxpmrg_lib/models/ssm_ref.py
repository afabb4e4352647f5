"""The selective scan's contract and its oracle: the shape check every path runs, and the plain
sequential loop the fast paths are tested against (mamba_ssm's `selective_scan_ref`, beside its kernels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference"]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, order=None) -> None:
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
    if order is not None and (order.dim() not in (1, 2) or order.shape[-1] != length
                              or (order.dim() == 2 and order.shape[0] not in (1, batch))):
        raise ValueError(f"order must be (length={length},) or (batch={batch}, length) positions; "
                         f"got shape {tuple(order.shape)}")
    if A.is_complex() or B.is_complex() or C.is_complex():
        raise ValueError("only real A, B, C are supported (Mamba-1 with real state)")


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
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
    return (y.to(dtype), h.to(dtype)) if return_last_state else y.to(dtype)
