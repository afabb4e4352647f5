"""The Vision Mamba encoder: shapes per preset, scan directions, 1-way -> 4-way weight copy."""
import pytest
import torch

from cxpmrg_lib.models.arm import ARMPretrainer
from cxpmrg_lib.models.vision_mamba import (DIRECTION_PARAMS, EncoderConfig, MambaMixer, VisionMamba,
                                            expand_to_four_way, sincos_pos_embed_2d)
from cxpmrg_lib.models.ssm import SCAN_ENV, compiled_available
from cxpmrg_lib.presets import PRESETS, get_preset

MAMBA_NAMES = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
               "dt_proj.bias", "A_log", "D", "out_proj.weight"}


def small(**kw):
    return EncoderConfig(**{"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, **kw})


def test_mixer_parameter_names_follow_mamba_ssm():
    enc = VisionMamba(small())
    names = {k.split("mixer.", 1)[1] for k in enc.state_dict() if ".mixer." in k and k.startswith("blocks.0.")}
    assert names == MAMBA_NAMES
    mixer = enc.blocks[0].mixer
    assert mixer.A_log.shape == (32, 16) and mixer.conv1d.kernel_size == (4,) and mixer.d_inner == 32
    # A = -(1..N) at init, dt = softplus(bias) inside mamba_ssm's [1e-3, 1e-1]
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1, 17).float())
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_preset_shapes(name):
    preset = get_preset(name)
    cfg = preset.encoder
    with torch.device("meta"):
        model = ARMPretrainer(preset.arm)
    n_params = sum(p.numel() for p in model.encoder.parameters())
    if name == "base":
        assert cfg.dim == 768 and cfg.depth == 12 and cfg.image_size == 192
        assert preset.arm.num_clusters == 9 and preset.arm.decoder_dim == 512
        assert 60e6 < n_params < 120e6
    x = torch.randn(2, 1, cfg.image_size, cfg.image_size)
    if name == "tiny":
        model = ARMPretrainer(preset.arm)
        out = model(x)
        k = preset.arm.num_clusters
        assert out["pred"].shape == (2, (k - 1) * 16, cfg.patch_size ** 2)
        assert torch.isfinite(out["loss"])
        enc = model.encoder(x)
        assert enc.tokens.shape == (2, cfg.num_patches, cfg.dim) and enc.pooled.shape == (2, cfg.dim)


def test_large_preset_on_meta_device():
    preset = get_preset("large")
    assert preset.encoder.dim == 1024 and preset.encoder.depth == 24
    assert preset.arm.feature_layers == (12, 16, 20, 24)
    with torch.device("meta"):
        enc = VisionMamba(EncoderConfig(**{**preset.encoder.to_dict(), "scan": "4-way"}))
        tokens = enc.embed(torch.empty(2, 1, 192, 192))
    assert tokens.shape == (2, 144, 1024) and tokens.device.type == "meta"
    n_params = sum(p.numel() for p in enc.parameters())
    assert 200e6 < n_params < 450e6


def test_presets_are_copies():
    p = get_preset("tiny")
    p.arm.encoder.dim = 999
    assert PRESETS["tiny"].arm.encoder.dim != 999


def test_grey_and_rgb_inputs():
    torch.manual_seed(0)
    grey = VisionMamba(small())
    rgb = VisionMamba(small(in_chans=3))
    x = torch.randn(2, 1, 32, 32)
    assert rgb(x).tokens.shape == (2, 16, 32)
    assert grey(x.expand(-1, 3, -1, -1)).tokens.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="32x32"):
        grey(torch.randn(1, 1, 40, 40))


def test_sincos_position_embedding_is_fixed_and_distinct():
    pe = sincos_pos_embed_2d(32, 4)
    assert pe.shape == (16, 32)
    assert torch.cdist(pe, pe).add(torch.eye(16) * 10).min() > 0.1
    enc = VisionMamba(small())
    assert "pos_embed" not in dict(enc.named_parameters())


def _dependence(mixer: MambaMixer, direction: str, grid: int) -> torch.Tensor:
    """dep[i, j] = True when output token i depends on input token j through that one direction."""
    mixer.directions = (direction,)
    x = torch.randn(1, grid * grid, mixer.in_proj.in_features, dtype=torch.float64, requires_grad=True)
    y = mixer.double()(x)
    dep = torch.zeros(grid * grid, grid * grid, dtype=torch.bool)
    for i in range(grid * grid):
        (g,) = torch.autograd.grad(y[0, i].sum(), x, retain_graph=True)
        dep[i] = g[0].abs().sum(-1) > 0
    return dep


@pytest.mark.parametrize("direction", ["", "_b", "_col", "_col_b"])
def test_each_scan_direction_reads_tokens_in_its_order(direction):
    torch.manual_seed(0)
    grid = 3
    mixer = MambaMixer(8, d_state=4, directions=("", "_b", "_col", "_col_b"), grid=grid)
    dep = _dependence(mixer, direction, grid)
    rows, cols = torch.arange(9) // 3, torch.arange(9) % 3
    pos = {"": rows * 3 + cols, "_b": 8 - (rows * 3 + cols), "_col": cols * 3 + rows,
           "_col_b": 8 - (cols * 3 + rows)}[direction]
    expected = pos[None, :] <= pos[:, None]        # causal in the direction's own order
    assert torch.equal(dep, expected)


def test_four_way_copy_starts_every_direction_from_the_one_way_weights():
    torch.manual_seed(0)
    one = VisionMamba(small())
    four = VisionMamba(small(scan="4-way"))
    sd = expand_to_four_way(one.state_dict())
    four.load_state_dict(sd, strict=True)
    m = four.blocks[1].mixer
    for name in DIRECTION_PARAMS:
        for suffix in ("_b", "_col", "_col_b"):
            a, b = getattr(m, name), getattr(m, name + suffix)
            a = a.weight if hasattr(a, "weight") else a
            b = b.weight if hasattr(b, "weight") else b
            assert torch.equal(a, b)
    # copies, not shared storage: training one direction leaves the others
    with torch.no_grad():
        m.A_log_b.add_(1.0)
    assert not torch.equal(m.A_log, m.A_log_b)
    # the extra directions read the grid in other orders, so the 4-way output differs from the 1-way one
    x = torch.randn(2, 1, 32, 32)
    assert four(x).tokens.shape == one(x).tokens.shape
    assert not torch.allclose(four(x).tokens, one(x).tokens)


def test_column_scans_need_the_full_grid():
    mixer = MambaMixer(8, d_state=4, directions=("", "_col"), grid=3)
    with pytest.raises(ValueError, match="full square grid"):
        mixer(torch.randn(1, 6, 8))


@pytest.mark.parametrize("scan", ["compiled", "torch"])
def test_merged_directions_equal_the_per_direction_loop(scan, monkeypatch):
    """The CPU path runs all directions in one batched scan; it must compute what separate scans do.
    With the compiled kernel the merged path also takes the compiled conv and the channels-last layout."""
    if scan == "compiled" and not compiled_available():
        pytest.skip("the compiled scan did not build here")
    monkeypatch.setenv(SCAN_ENV, scan)
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4, directions=("", "_b", "_col", "_col_b"), grid=3).double()
    with torch.no_grad():                          # directions that differ from each other
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    # A_log passes through float32 (.float()) in both paths: gradients agree to float32 rounding
    _assert_merged_equals_loop(mixer, h, (1e-10, 1e-12), (1e-5, 1e-9))


def _assert_merged_equals_loop(mixer, h, out_tol, grad_tol):
    """The mixer's output and every gradient (input and parameters) with merge_directions on and off."""
    params = [h, *mixer.parameters()]
    results = []
    for merge in (True, False):
        mixer.merge_directions = merge
        y = mixer(h)
        results.append((y.detach(), torch.autograd.grad((y * y.detach().sin()).sum(), params)))
    (y1, g1), (y2, g2) = results
    assert torch.allclose(y1, y2, rtol=out_tol[0], atol=out_tol[1])
    for (name, _), a, b in zip([("input", None), *mixer.named_parameters()], g1, g2):
        assert torch.allclose(a, b, rtol=grad_tol[0], atol=grad_tol[1]), name


@pytest.mark.skipif(not compiled_available(), reason="the compiled scan did not build here")
def test_merged_compiled_path_float32_full_blocks():
    """float32 with 16 states and 64 channels (full vector blocks, the specialised kernels): the merged
    compiled path (conv, channels-last scan) against the per-direction loop, values and gradients."""
    torch.manual_seed(0)
    mixer = MambaMixer(32, d_state=16, directions=("", "_b", "_col", "_col_b"), grid=4)
    _assert_merged_equals_loop(mixer, torch.randn(3, 16, 32, requires_grad=True), (1e-4, 1e-5), (1e-3, 1e-5))


def test_conv_stem_tokens_each_see_exactly_their_own_patch():
    """The conv stem must keep stage 1's next-patch prediction leak-free: token k depends only on
    patch k's pixels, and nothing of another study in the batch."""
    enc = VisionMamba(EncoderConfig(image_size=64, patch_size=16, dim=32, depth=1, stem="conv"))
    images = torch.randn(2, 1, 64, 64, requires_grad=True)
    for k in (0, 5, 15):
        images.grad = None
        enc.embed(images)[0, k].sum().backward()
        seen = images.grad[0, 0].abs() > 0
        row, col = divmod(k, 4)
        expected = torch.zeros(64, 64, dtype=torch.bool)
        expected[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = True
        assert torch.equal(seen, expected)
        assert images.grad[1].abs().sum() == 0
    # the config round-trips (run folders rebuild encoders from to_dict) and an old config means "patch"
    assert EncoderConfig(**enc.config.to_dict()).stem == "conv"
    old = {k: v for k, v in EncoderConfig().to_dict().items() if k != "stem"}
    assert isinstance(VisionMamba(EncoderConfig(**old)).patch_embed, torch.nn.Conv2d)


@pytest.mark.parametrize("bad", [dict(stem="resnet"), dict(stem="conv", patch_size=6, image_size=36)])
def test_bad_stem_is_refused(bad):
    with pytest.raises(ValueError, match="stem"):
        EncoderConfig(**bad)


def _steps_with_mixer_switch(model, images, monkeypatch, switch):
    """A training step's tokens and parameter gradients with the MambaMixer class switch on, then off."""
    results = []
    for on in (True, False):
        monkeypatch.setattr(MambaMixer, switch, on)
        model.zero_grad(set_to_none=True)
        tokens = model(images).tokens
        (tokens * tokens.detach().sin()).sum().backward()
        results.append((tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.skipif(not compiled_available(), reason="the compiled scan did not build here")
@pytest.mark.parametrize("scan", ["4-way", "1-way"])
def test_folded_directions_equal_the_stacked_mean_bit_for_bit(scan, monkeypatch):
    """The compiled grouped scan (one z for every direction, the directions' mean in the kernel) gives the same
    bits as repeating z and averaging the stacked outputs in torch: tokens and every gradient of a training step."""
    torch.manual_seed(0)
    model = VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=32, depth=2, scan=scan))
    images = torch.randn(3, 1, 32, 32)
    (t1, g1), (t2, g2) = _steps_with_mixer_switch(model, images, monkeypatch, "fold_directions")
    assert torch.equal(t1, t2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.skipif(not compiled_available(), reason="the compiled scan did not build here")
@pytest.mark.parametrize("scan,dtype", [("4-way", torch.float32), ("1-way", torch.float32), ("4-way", torch.float64)])
def test_fused_core_equals_the_composed_path(scan, dtype, monkeypatch):
    """The mixer's compiled core as one autograd node (`mixer_merged`) against the same ops composed under autograd:
    tokens and every gradient of a training step, at 1 and 2 threads. (float32: the same bits on this machine's
    GEMM; float64: the composed path rounds the A and D gradients through float32.)"""
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=32, depth=2, scan=scan)).to(dtype)
            images = torch.randn(3, 1, 32, 32, dtype=dtype)
            (t1, g1), (t2, g2) = _steps_with_mixer_switch(model, images, monkeypatch, "fused_core")
            torch.testing.assert_close(t1, t2, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-7)
            for name in g1:
                torch.testing.assert_close(g1[name], g2[name], **tol, msg=name)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not compiled_available(), reason="the compiled scan did not build here")
def test_fused_core_gradcheck_float64():
    from cxpmrg_lib.models.mixer_merged import merged_mixer_core

    torch.manual_seed(1)
    g, b, length, d, n, r, k = 4, 2, 9, 5, 3, 2, 4
    mixer = MambaMixer(d, d_state=n, directions=("", "_b", "_col", "_col_b"), grid=3)
    orders = mixer.scan_orders(length)
    args = [torch.randn(b, length, 2 * d), 0.5 * torch.randn(g, d, k), 0.1 * torch.randn(g, d),
            0.5 * torch.randn(g, r + 2 * n, d), 0.5 * torch.randn(g, d, r), -torch.rand(g, d, n) - 0.5,
            torch.randn(g, d), 0.1 * torch.randn(g, d)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: merged_mixer_core(*a, orders, n), args)


@pytest.mark.parametrize("scan", ["4-way", "1-way"])
def test_the_scan_record_of_a_run_summary_names_the_path_that_ran(scan, monkeypatch):
    """A stage run's summary says which scan its training used (`take_scan_impls`): the encoder's mixers record
    the compiled kernel whichever way they call it (the one-node core included), and the pure-PyTorch path."""
    from cxpmrg_lib.models.ssm import take_scan_impls

    model = VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=32, depth=1, scan=scan))
    images = torch.randn(2, 1, 32, 32)
    for forced, want in (("auto", "compiled" if compiled_available() else "pytorch"), ("torch", "pytorch")):
        monkeypatch.setenv(SCAN_ENV, forced)
        take_scan_impls()
        model(images).tokens.sum().backward()
        assert take_scan_impls() == want
