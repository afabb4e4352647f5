"""The causal depthwise conv + SiLU of a Vision Mamba mixer, all scan directions in one compiled op.

Each direction g of the merged multi-direction mixer (vision_mamba.MambaMixer._scan_merged)
convolves the tokens in its own scan order. The pure-PyTorch way gathers x into every order,
runs a grouped conv1d, and gathers the result back to token order; on a CPU those gathers, the
conv's backward and the layout copies between them cost about as much as the selective scan
itself (4-way tiny encoder, 128 px: conv + gathers + copies ~20% of a training step). The
compiled op (csrc/selective_scan.cpp, conv_fwd/conv_bwd, built with the scan) reads x in token
order through the orders and writes (G, batch, length, dim) with channels innermost, the layout
in which the x projection is one batched matmul and the scan reads its inputs without copies.
When x's channels are contiguous (a slice of the in projection's output, as the mixer passes it) each
step handles all channels of its token, so the output and its gradient are written and read in whole
rows (about 0.75x the conv's time in a 4-way training step at 384 px; the same bits as the block loops).
It is there exactly when the compiled scan is (`ssm.compiled_available()`). `mixer_merged` calls the
ops directly inside the mixer's one-node core.
"""
from __future__ import annotations

import torch

from cxpmrg_lib.models.ssm_build import load_kernel as _ops

__all__ = ["causal_conv_silu"]


class _ConvSiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, orders):
        ctx.save_for_backward(x, weight, bias, orders)
        return _ops().conv_fwd(x, weight, bias, orders, True)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, orders = ctx.saved_tensors
        with torch.autocast(dout.device.type, enabled=False):
            dx, dw, db = _ops().conv_bwd(dout, x, weight, bias, orders, True, None)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv1d) of x in each direction's order, returned in token order.

    x (batch, dim, length), any strides (channels contiguous is fastest); weight (G, dim, K);
    bias (G, dim); orders (G, length) int64, step t of direction g reading token orders[g, t].
    Returns (G, batch, length, dim): out[g, b, p] is direction g's output at token p, that is
    silu(bias[g] + sum_j weight[g, :, j] * x[b, :, orders[g, t - K + 1 + j]]) for t with
    orders[g, t] = p (taps before the first step are zero, as with conv1d's padding K - 1).
    Computes in float32 (float64 stays float64), also under autocast.
    """
    ops = _ops()
    if ops is None:
        raise RuntimeError("the compiled mixer conv is unavailable (the selective-scan extension did not build; "
                           "see the log)")
    if x.device.type != "cpu":
        raise ValueError(f"the compiled mixer conv runs on CPU tensors; got {x.device}")
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != x.shape[1] or bias.shape != weight.shape[:2] \
            or orders.shape != (weight.shape[0], x.shape[2]):
        raise ValueError(f"shapes: x (batch, dim, length) {tuple(x.shape)}, weight (G, dim, K) {tuple(weight.shape)}, "
                         f"bias (G, dim) {tuple(bias.shape)}, orders (G, length) {tuple(orders.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        return _ConvSiluFn.apply(x.to(compute), weight.to(compute).contiguous(), bias.to(compute).contiguous(),
                                 orders.to(torch.long).contiguous())
