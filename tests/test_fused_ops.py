"""The compiled RMSNorm and SwiGLU gate of the Vision Mamba block (models/fused_ops.py) against torch's layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models import fused_ops
from cxpmrg_lib.models.fused_ops import RMSNorm, fused_applies, swiglu
from cxpmrg_lib.models.ssm import SCAN_ENV, compiled_available
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba

needs_kernel = pytest.mark.skipif(not compiled_available(), reason="the compiled scan extension did not build here")


def _norms(dim, dtype=torch.float32, eps=1e-5, seed=0):
    torch.manual_seed(seed)
    ours = RMSNorm(dim, eps=eps).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
    theirs = nn.RMSNorm(dim, eps=eps).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _reference_swiglu(h):
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


# Row widths with and without a tail beyond whole vectors (16 float lanes with AVX-512, 8 without).
SHAPES = [(8, 64, 128), (3, 5, 7), (2, 129), (1, 1, 16), (4, 0, 24)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_matches_torch_values_and_gradients(shape):
    ours, theirs = _norms(shape[-1])
    x = (3 * torch.randn(*shape)).requires_grad_()
    assert fused_applies(x)
    y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    got = torch.autograd.grad((y * dy).sum(), (x, ours.weight))
    exp = torch.autograd.grad((want * dy).sum(), (x, theirs.weight))
    for name, a, e in zip(("x", "weight"), got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_torch_values_and_gradients(shape):
    torch.manual_seed(1)
    h = (3 * torch.randn(*shape[:-1], 2 * shape[-1])).requires_grad_()
    out, want = swiglu(h), _reference_swiglu(h)
    assert out.shape == (*shape[:-1], shape[-1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    d = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad((out * d).sum(), h)[0],
                               torch.autograd.grad((want * d).sum(), h)[0], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_gradcheck_float64():
    norm, _ = _norms(37, torch.float64)
    x = torch.randn(3, 4, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused_ops._RMSNormFn.apply(x, w, 1e-5), (x, norm.weight))
    h = torch.randn(5, 2 * 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    assert fused_applies(h)


@needs_kernel
def test_weight_gradient_is_the_same_for_any_thread_count():
    """The weight's gradient sums fixed blocks of rows in order: bit-identical at 1 and 2 threads."""
    norm, _ = _norms(128)
    x = torch.randn(8, 300, 128)
    dy = torch.randn_like(x)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            norm.weight.grad = None
            norm(x).backward(dy)
            grads.append(norm.weight.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])


def test_torch_layers_run_when_the_compiled_path_is_off(monkeypatch):
    """CXPMRG_SCAN=torch (the pure-PyTorch path) and autocast take torch's own layers, exactly."""
    monkeypatch.setenv(SCAN_ENV, "torch")
    ours, theirs = _norms(24)
    x = torch.randn(2, 3, 24)
    assert not fused_applies(x)
    assert torch.equal(ours(x), theirs(x))
    h = torch.randn(2, 3, 48)
    assert torch.equal(swiglu(h), _reference_swiglu(h))
    monkeypatch.delenv(SCAN_ENV)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applies(x)
        assert torch.equal(ours(x), theirs(x))


def test_odd_gate_width_is_refused():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(2, 5))


@needs_kernel
def test_encoder_with_and_without_the_fused_layers(monkeypatch):
    """A whole tiny encoder's training step: the compiled norms and gate change only rounding."""
    torch.manual_seed(0)
    cfg = EncoderConfig(image_size=32, patch_size=8, dim=32, depth=2, scan="4-way")
    model = VisionMamba(cfg)
    images = torch.randn(2, 1, 32, 32)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(fused_ops, "fused_applies", lambda x, _on=fused: _on and x.dtype == torch.float32)
        model.zero_grad(set_to_none=True)
        tokens = model(images).tokens
        tokens.pow(2).mean().backward()
        results.append((tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (t1, g1), (t2, g2) = results
    torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-3, atol=1e-5, msg=name)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_swiglu_with_a_bias_matches_torch(shape):
    """swiglu(h, bias) is the gate of h + bias (the MLP's first layer's bias, added by the gate): values and the
    gradients of h and of the bias."""
    torch.manual_seed(2)
    h = (3 * torch.randn(*shape[:-1], 2 * shape[-1])).requires_grad_()
    bias = torch.randn(2 * shape[-1], requires_grad=True)
    out, want = swiglu(h, bias), _reference_swiglu(h + bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    d = torch.randn_like(out)
    got = torch.autograd.grad((out * d).sum(), (h, bias))
    exp = torch.autograd.grad((want * d).sum(), (h, bias))
    for name, a, e in zip(("h", "bias"), got, exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


@needs_kernel
def test_swiglu_with_a_bias_gradcheck_and_errors():
    h = torch.randn(4, 2 * 19, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h, bias))
    with pytest.raises(ValueError, match="bias"):
        swiglu(torch.randn(2, 8), torch.randn(4))


@needs_kernel
def test_mlp_adds_fc1_bias_in_the_gate():
    """The block's SwiGLU MLP with the compiled gate adds fc1's bias in the gate instead of in the matmul: the
    same function, to float32 rounding (on this machine's GEMM, the same bits)."""
    from cxpmrg_lib.models.vision_mamba import SwiGLU

    torch.manual_seed(3)
    mlp = SwiGLU(32, 88)
    with torch.no_grad():
        mlp.fc1.bias.normal_()
    x = torch.randn(3, 7, 32, requires_grad=True)
    y = mlp(x)
    want = mlp.fc2(_reference_swiglu(mlp.fc1(x)))
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    d = torch.randn_like(y)
    params = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight)
    for a, e in zip(torch.autograd.grad((y * d).sum(), params), torch.autograd.grad((want * d).sum(), params)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
