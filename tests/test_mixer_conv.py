"""The compiled causal depthwise conv + SiLU of the merged mixer (models/mixer_conv.py) against conv1d."""
import pytest
import torch
import torch.nn.functional as F

from cxpmrg_lib.models import mixer_conv
from cxpmrg_lib.models.ssm import compiled_available

pytestmark = pytest.mark.skipif(not compiled_available(), reason="the compiled scan extension did not build here")


def reference(x, weight, bias, orders):
    """Gather into each direction's order, conv1d with padding K - 1, SiLU, scatter back to tokens."""
    g_count, dim, k = weight.shape
    outs = []
    for g in range(g_count):
        o = orders[g]
        y = F.silu(F.conv1d(x[:, :, o], weight[g][:, None, :], bias[g], padding=k - 1, groups=dim)[..., :x.shape[2]])
        tok = torch.empty_like(y)
        tok[:, :, o] = y
        outs.append(tok.transpose(1, 2))
    return torch.stack(outs)


def _inputs(batch, dim, length, dtype, channels_last, g_count=4, k=4, seed=0):
    torch.manual_seed(seed)
    if channels_last:    # a slice of a (batch, length, 2 dim) projection, as the mixer passes it
        x = torch.randn(batch, length, 2 * dim, dtype=dtype)[..., :dim].transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, dtype=dtype)
    weight = torch.randn(g_count, dim, k, dtype=dtype)
    bias = torch.randn(g_count, dim, dtype=dtype)
    orders = torch.stack([torch.randperm(length) for _ in range(g_count)])
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), orders


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(3, 40, 16), (2, 32, 64), (1, 5, 3)])
def test_matches_conv1d_values_and_gradients(shape, channels_last):
    x, w, b, orders = _inputs(*shape, torch.float32, channels_last)
    out = mixer_conv.causal_conv_silu(x, w, b, orders)
    ref = reference(x, w, b, orders)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight).sum(), (x, w, b))
    want = torch.autograd.grad((ref * weight).sum(), (x, w, b))
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_gradcheck_float64():
    x, w, b, orders = _inputs(2, 19, 9, torch.float64, channels_last=True)
    assert torch.autograd.gradcheck(lambda x, w, b: mixer_conv.causal_conv_silu(x, w, b, orders), (x, w, b))


def test_shape_errors_name_the_arguments():
    x, w, b, orders = _inputs(2, 8, 6, torch.float32, channels_last=False)
    with pytest.raises(ValueError, match="orders"):
        mixer_conv.causal_conv_silu(x, w, b, orders[:, :5])


@pytest.mark.parametrize("shape", [(3, 40, 16), (2, 32, 64), (2, 17, 3)])
def test_channels_last_rows_path_equals_the_block_path_bit_for_bit(shape):
    """x with contiguous channels takes the whole-row loops (all channels of a token per step); any other layout
    the channel-block loops. Same arithmetic in the same order: the same bits, forward and backward, at 1 and 2
    threads (float32 and float64)."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                x, w, b, orders = _inputs(*shape, dtype, channels_last=True)
                results = []
                for xin in (x, x.detach().contiguous().requires_grad_()):
                    assert (xin.stride(1) == 1) == (xin is x)
                    out = mixer_conv.causal_conv_silu(xin, w, b, orders)
                    grads = torch.autograd.grad((out * out.detach().cos()).sum(), (xin, w, b))
                    results.append((out, grads))
                (o1, g1), (o2, g2) = results
                assert torch.equal(o1, o2)
                for a, e in zip(g1, g2):
                    assert torch.equal(a, e)
    finally:
        torch.set_num_threads(before)
