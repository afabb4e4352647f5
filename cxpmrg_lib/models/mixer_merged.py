"""The compiled core of a merged multi-direction Mamba mixer on a CPU, as one autograd node.

Between the in projection and the out projection, `vision_mamba.MambaMixer._scan_merged` runs every
scan direction's causal conv + SiLU (`mixer_conv`), x projection, dt projection and selective scan
(`ssm.selective_scan_compiled`, grouped: the directions gated by the one z and averaged). Composed
from those ops, autograd's backward adds four passes over the activations that are only bookkeeping:
it concatenates the x and z halves' gradients (the in projection's output was chunked), copies that
into the in projection's layout, concatenates the gradients of dt, B and C (the x projection's output
was split), and adds the two gradients of the conv's output (the scan's and the x projection's).
Here the backward writes the conv's and the scan's gradients straight into the halves of one
(batch, length, 2 dim) buffer, the dt, B and C gradients into the columns of one buffer, and adds the
x projection's gradient into the scan's in the GEMM (`baddbmm_`). The arithmetic is the composed
path's (tests/test_vision_mamba.py compares the two).
"""
from __future__ import annotations

import torch

from cxpmrg_lib.models.ssm import record_scan_impl
from cxpmrg_lib.models.ssm_build import load_kernel as _ops

__all__ = ["merged_mixer_core", "seq_major", "per_sequence"]


def seq_major(t: torch.Tensor, g: int, b: int, length: int) -> torch.Tensor:
    """(G, B*L, c) -> (G*B, c, L), a view."""
    return t.reshape(g * b, length, t.shape[-1]).transpose(1, 2)


def per_sequence(t: torch.Tensor, b: int) -> torch.Tensor:
    """(G, ...) -> (G*B, ...): direction g's parameters for each of its B sequences (contiguous)."""
    g = t.shape[0]
    return t.unsqueeze(1).expand(g, b, *t.shape[1:]).reshape(g * b, *t.shape[1:]).contiguous()


class _MergedMixerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, a, skip, dt_bias, orders, d_state: int):
        ops = _ops()
        b, length, two_d = xz.shape
        d, g = two_d // 2, conv_w.shape[0]
        n, r = d_state, dt_proj_w.shape[-1]
        x, z = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)              # (B, d, L) views
        xc = ops.conv_fwd(x, conv_w, conv_b, orders, True)                         # (G, B, L, d)
        xc_rows = xc.view(g, b * length, d)
        x_dbl = torch.bmm(xc_rows, x_proj_w.transpose(1, 2))                       # (G, B*L, r + 2n)
        dt = x_dbl[..., :r]
        delta = torch.bmm(dt, dt_proj_w.transpose(1, 2))                            # (G, B*L, d)
        seq = dict(g=g, b=b, length=length)
        u, delta_s = seq_major(xc_rows, **seq), seq_major(delta, **seq)
        b_in, c_in = seq_major(x_dbl[..., r:r + n], **seq), seq_major(x_dbl[..., r + n:], **seq)
        a_s, skip_s, bias_s = per_sequence(a, b), per_sequence(skip, b), per_sequence(dt_bias, b)
        order_s = per_sequence(orders, b)
        keep = any(ctx.needs_input_grad)
        y, _, ckpt = ops.scan_fwd(u, delta_s, a_s, b_in, c_in, skip_s, z, bias_s, order_s, True, keep, False, g)
        if keep:
            ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, orders, xc, x_dbl, delta, a_s, skip_s,
                                  bias_s, order_s, ckpt)
            ctx.shape = (g, b, length, d, n, r)
        return y                                                                      # (B, d, L), channels innermost

    @staticmethod
    def backward(ctx, dy):
        (xz, conv_w, conv_b, x_proj_w, dt_proj_w, orders, xc, x_dbl, delta, a_s, skip_s, bias_s, order_s,
         ckpt) = ctx.saved_tensors
        g, b, length, d, n, r = ctx.shape
        ops = _ops()
        seq = dict(g=g, b=b, length=length)
        xc_rows = xc.view(g, b * length, d)
        u, delta_s = seq_major(xc_rows, **seq), seq_major(delta, **seq)
        b_in, c_in = seq_major(x_dbl[..., r:r + n], **seq), seq_major(x_dbl[..., r + n:], **seq)
        x, z = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)
        dxz = torch.empty_like(xz)                                                    # (B, L, 2d)
        with torch.autocast("cpu", enabled=False):
            du, ddelta, da_s, db_s, dc_s, dskip_s, _, dbias_s = ops.scan_bwd(
                dy.to(xz.dtype), None, u, delta_s, a_s, b_in, c_in, skip_s, z, bias_s, order_s, ckpt, True, g,
                dxz[..., d:].transpose(1, 2))                                      # dz: the z half of dxz
            ddelta_rows = ddelta.transpose(1, 2).reshape(g, b * length, d)            # delta's layout: a view
            dt = x_dbl[..., :r]
            dx_dbl = torch.empty_like(x_dbl)
            dx_dbl[..., :r].copy_(torch.bmm(ddelta_rows, dt_proj_w))
            dx_dbl[..., r:r + n].copy_(db_s.transpose(1, 2).reshape(g, b * length, n))
            dx_dbl[..., r + n:].copy_(dc_s.transpose(1, 2).reshape(g, b * length, n))
            d_dt_proj_w = torch.bmm(dt.transpose(1, 2), ddelta_rows).transpose(1, 2)
            dxc = du.transpose(1, 2).reshape(g, b * length, d)                        # u's layout: a view
            dxc.baddbmm_(dx_dbl, x_proj_w)                                            # + the x projection's share
            d_x_proj_w = torch.bmm(xc_rows.transpose(1, 2), dx_dbl).transpose(1, 2)
            _, dconv_w, dconv_b = ops.conv_bwd(dxc.view(g, b, length, d), x, conv_w, conv_b, orders, True,
                                               dxz[..., :d].transpose(1, 2))          # dx: the x half of dxz

        def per_dir(t):                                                               # (G*B, ...) -> (G, ...)
            return t.view(g, b, *t.shape[1:]).sum(1)

        return (dxz, dconv_w, dconv_b, d_x_proj_w, d_dt_proj_w, per_dir(da_s), per_dir(dskip_s), per_dir(dbias_s),
                None, None)


def merged_mixer_core(xz: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, x_proj_w: torch.Tensor,
                      dt_proj_w: torch.Tensor, a: torch.Tensor, skip: torch.Tensor, dt_bias: torch.Tensor,
                      orders: torch.Tensor, d_state: int) -> torch.Tensor:
    """The mean over G scan directions of conv -> projections -> selective scan, gated by z.

    xz (B, L, 2d): the in projection's output, x then z; conv_w (G, d, K), conv_b (G, d); x_proj_w
    (G, r + 2n, d); dt_proj_w (G, d, r); a (G, d, n) (A, negative); skip (G, d) (D); dt_bias (G, d);
    orders (G, L) int64 (direction g's step t reads token orders[g, t]). Returns (B, d, L) in token
    order, stored with channels innermost (its transpose, the out projection's input, is contiguous).
    float32 or float64 CPU tensors of one dtype, outside autocast.
    """
    if _ops() is None:
        raise RuntimeError("the compiled mixer core is unavailable (the selective-scan extension did not build; "
                           "see the log)")
    record_scan_impl("compiled")                      # the run summary's record of which scan ran
    return _MergedMixerFn.apply(xz.contiguous(), conv_w.contiguous(), conv_b.contiguous(), x_proj_w.contiguous(),
                                dt_proj_w.contiguous(), a.contiguous(), skip.contiguous(), dt_bias.contiguous(),
                                orders.to(torch.long).contiguous(), int(d_state))
