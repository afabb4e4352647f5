"""The Vision Mamba block's RMSNorm and SwiGLU gate as compiled CPU ops (csrc/fused_ops.cpp), with torch's
own layers as the fallback.

On a CPU torch composes RMSNorm from pow, mean, add, rsqrt and two multiplications, and the SwiGLU
gate from chunk, silu and a multiplication whose backward concatenates the two halves' gradients:
each a pass over the activations. For the tiny encoder's 128-wide tokens those passes cost more
than their arithmetic; the compiled ops make one pass forward and one backward each. They run
where the compiled mixer does (`compiled_cpu`: a CPU tensor, the compiled scan built and not
switched off by CXPMRG_SCAN), for float32 and float64 outside autocast; everywhere else torch's
layers run. Both compute the same function (tests/test_fused_ops.py: gradcheck, and agreement
with torch's layers); their float32 results differ in the last bits (another summation order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.ssm import compiled_available, scan_impl_name
from cxpmrg_lib.models.ssm_build import load_kernel as _ops

__all__ = ["RMSNorm", "swiglu", "compiled_cpu", "fused_applies"]


def compiled_cpu(x: torch.Tensor) -> bool:
    """Whether the mixer and the block take the compiled CPU kernels for x."""
    return x.device.type == "cpu" and scan_impl_name("cpu") == "compiled" and compiled_available()


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the compiled RMSNorm and gate run for x (else torch's layers)."""
    return (x.dtype in (torch.float32, torch.float64) and compiled_cpu(x)
            and not torch.is_autocast_enabled("cpu"))


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _ops().rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _ops().rmsnorm_bwd(dy, x, weight, rstd)
        return dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return _ops().swiglu_fwd(h, bias)

    @staticmethod
    def backward(ctx, dout):
        h, bias = ctx.saved_tensors
        dh = _ops().swiglu_bwd(dout, h, bias)
        dbias = dh.view(-1, dh.shape[-1]).sum(0) if bias is not None and ctx.needs_input_grad[1] else None
        return dh, dbias


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters, same state dict) whose CPU forward and backward are one compiled pass
    each where `fused_applies`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight is not None and len(self.normalized_shape) == 1 and x.dtype == self.weight.dtype
                and fused_applies(x)):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return _RMSNormFn.apply(x.contiguous(), self.weight.contiguous(), float(eps))
        return super().forward(x)


def swiglu(h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * value of h (..., 2H) whose last dim holds the gate, then the value -> (..., H).

    With `bias` (2H,), of h + bias: the bias of the linear layer that made h, added here instead of
    in a pass of its own (`SwiGLU`).
    """
    if h.shape[-1] % 2:
        raise ValueError(f"the gate and value halves need an even last dim, got {h.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (h.shape[-1],):
        raise ValueError(f"the bias must be ({h.shape[-1]},) like h's last dim; got {tuple(bias.shape)}")
    if fused_applies(h) and (bias is None or bias.dtype == h.dtype):
        return _SwiGLUFn.apply(h.contiguous(), None if bias is None else bias.contiguous())
    if bias is not None:
        h = h + bias
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value
