"""The released MambaXray-VL encoder (`EncoderConfig(arch="released")`) and its checkpoints (`models.released`).

The reference forward pass below is written from the released code's maths (Event-AHU/Medical_Image_Analysis,
CXPMRG_Bench_MambaXray_VL: `mamba_simple.py` "v3", `models_mamba.py`, `models_pretrain.py`), independently of
the library: a plain selective-scan loop in float64, LayerNorm blocks, and the v3 directions done with the same
tensor moves as there (flip; the class token taken out, the grid transposed, the class token put back).
The released state dicts are built here from those files' names and shapes, with random values.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from cxpmrg_lib.models.arm import cluster_order
from cxpmrg_lib.models.released import (ReleasedCheckpointError, load_encoder, stage1_to_stage2, to_released_names)
from cxpmrg_lib.models.ssm import SCAN_ENV, compiled_available
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
from cxpmrg_lib.presets import get_preset

V3 = ("", "_b", "_c", "_c_b")


# ---------------------------------------------------------------- released state dicts, random values

def released_state(dim=32, depth=2, grid=4, patch=8, d_state=8, four_way=True, hidden=None, seed=0,
                   dt_rank=None):
    """A released encoder state dict (stage-2/3 names; stage-1 ones without `four_way`), random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    r = dt_rank or math.ceil(dim / 16)
    hidden = hidden or dim * 4 * 2 // 3
    m = grid * grid
    sd = {"patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          "patch_embed.proj.bias": rnd(dim, scale=0.1),
          "pos_embed": rnd(1, m + int(four_way), dim, scale=0.5)}
    if four_way:
        sd["cls_token"] = rnd(1, 1, dim)
    for i in range(depth):
        p = f"layers.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = 1 + rnd(dim, scale=0.1)
            sd[p + norm + ".bias"] = rnd(dim, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * dim, dim, scale=dim ** -0.5)
        sd[p + "mixer.out_proj.weight"] = rnd(dim, dim, scale=0.5 * dim ** -0.5)
        for s in (V3 if four_way else ("",)):
            sd[p + f"mixer.A{s}_log"] = (torch.log(torch.arange(1, d_state + 1.0)).repeat(dim, 1)
                                        + rnd(dim, d_state, scale=0.3))
            sd[p + f"mixer.conv1d{s}.weight"] = rnd(dim, 1, 4, scale=0.5)
            sd[p + f"mixer.conv1d{s}.bias"] = rnd(dim, scale=0.1)
            sd[p + f"mixer.x_proj{s}.weight"] = rnd(r + 2 * d_state, dim, scale=dim ** -0.5)
            sd[p + f"mixer.dt_proj{s}.weight"] = rnd(dim, r, scale=r ** -0.5)
            dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            sd[p + f"mixer.dt_proj{s}.bias"] = dt + torch.log(-torch.expm1(-dt))
            sd[p + f"mixer.D{s}"] = 1 + rnd(dim, scale=0.2)
        sd[p + "mlp.w1.weight"] = rnd(hidden, dim, scale=dim ** -0.5)
        sd[p + "mlp.w1.bias"] = rnd(hidden, scale=0.1)
        sd[p + "mlp.w2.weight"] = rnd(hidden, dim, scale=dim ** -0.5)
        sd[p + "mlp.w2.bias"] = rnd(hidden, scale=0.1)
        sd[p + "mlp.w3.weight"] = rnd(dim, hidden, scale=0.5 * hidden ** -0.5)
        sd[p + "mlp.w3.bias"] = rnd(dim, scale=0.1)
    if four_way:
        sd["norm_f.weight"] = 1 + rnd(dim, scale=0.1)
        sd["norm_f.bias"] = rnd(dim, scale=0.1)
    return sd


def stage1_file_model(dim=32, depth=2, grid=8, patch=8, d_state=8, seed=0):
    """The `model` of a released stage-1 checkpoint: the encoder, its feature norms and a decoder's keys."""
    sd = released_state(dim, depth, grid, patch, d_state, four_way=False, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k in (1, 2, 3, 4):
        sd[f"norm_{k}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[f"norm_{k}.bias"] = 0.1 * torch.randn(dim, generator=g)
    dec = 16
    sd.update({"ar_token": torch.zeros(1, 1, dec), "dec_pos_embed": torch.zeros(1, grid * grid, dec),
               "enc2dec.weight": torch.randn(4 * dec, 4 * dim, generator=g), "enc2dec.bias": torch.zeros(4 * dec),
               "dec_block.0.attn2.q.weight": torch.randn(dec, dec, generator=g),
               "dec_block.0.norm2_1.weight": torch.ones(dec), "ar_norm.weight": torch.ones(dec),
               "ar_norm.bias": torch.zeros(dec), "ar_pred.weight": torch.randn(patch * patch * 3, dec, generator=g),
               "ar_pred.bias": torch.zeros(patch * patch * 3), "mask": torch.zeros(48, 48)})
    return sd


def save_stage(path, stage, encoder_state, extra_seed=0):
    """`encoder_state` written in the released file format of `stage` (1, 2 or 3)."""
    g = torch.Generator().manual_seed(extra_seed)
    dim = encoder_state["patch_embed.proj.weight"].shape[0]
    if stage == 1:
        obj = {"model": encoder_state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "scaler": {},
               "args": argparse.Namespace(model="arm_base_pz16", input_size=192, lr=1.5e-4)}
    else:
        model = {"visual_encoder." + k: v for k, v in encoder_state.items()}
        if stage == 2:
            model.update({"text_encoder.embeddings.word_embeddings.weight": torch.randn(10, 8, generator=g),
                          "vision_proj.weight": torch.randn(6, dim, generator=g), "vision_proj.bias": torch.zeros(6),
                          "text_proj.weight": torch.randn(6, 8, generator=g), "text_proj.bias": torch.zeros(6),
                          "logit_scale": torch.tensor(math.log(1 / 0.07))})
        else:
            model.update({"llama_proj.weight": torch.randn(12, dim, generator=g), "llama_proj.bias": torch.zeros(12),
                          "layer_norm.weight": torch.ones(12), "layer_norm.bias": torch.zeros(12)})
        obj = {"model": model, "config": argparse.Namespace(type="base", beam_size=3), "epoch": 1, "step": 10}
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------- the released forward pass, written out

def ref_scan(u, delta, a, b, c, d, z):
    """Mamba-1 selective scan, one step at a time: u, delta, z (B, D, L); a (D, N); b, c (B, N, L); d (D,)."""
    h = u.new_zeros(u.shape[0], u.shape[1], a.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * a) * h + dt * b[:, None, :, t] * u[:, :, t, None]
        ys.append((h * c[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + d[:, None] * u
    return y * F.silu(z)


def ref_inner(xz, p, s):
    """mamba_inner_fn without the out projection: causal conv + SiLU, x/dt projections, the gated scan."""
    x, z = xz.chunk(2, dim=1)
    length, width = x.shape[-1], x.shape[1]
    w = p[f"conv1d{s}.weight"]
    x = F.silu(F.conv1d(x, w, p[f"conv1d{s}.bias"], padding=w.shape[-1] - 1, groups=width)[..., :length])
    x_dbl = torch.einsum("bdl,ed->ble", x, p[f"x_proj{s}.weight"])
    r = p[f"dt_proj{s}.weight"].shape[1]
    n = p[f"A{s}_log"].shape[1]
    dt, bm, cm = x_dbl.split([r, n, n], dim=-1)
    delta = F.softplus(torch.einsum("blr,dr->bdl", dt, p[f"dt_proj{s}.weight"]) + p[f"dt_proj{s}.bias"][:, None])
    return ref_scan(x, delta, -torch.exp(p[f"A{s}_log"]), bm.transpose(1, 2), cm.transpose(1, 2), p[f"D{s}"], z)


def ref_mixer(h, p, four_way):
    xz = torch.einsum("bld,ed->bel", h, p["in_proj.weight"])
    if not four_way:
        return torch.einsum("bdl,ed->ble", ref_inner(xz, p, ""), p["out_proj.weight"])
    out = ref_inner(xz, p, "")
    out_b = ref_inner(xz.flip([-1]), p, "_b")
    bsz, width, length = xz.shape
    pos = length // 2
    side = int(math.sqrt(length))
    cls, xc = xz[:, :, pos:pos + 1], torch.cat([xz[:, :, :pos], xz[:, :, pos + 1:]], dim=-1)
    xc = xc.reshape(bsz, width, side, side).permute(0, 1, 3, 2).reshape(bsz, width, -1)
    xc = torch.cat([xc[:, :, :pos], cls, xc[:, :, pos:]], dim=-1)
    out_c = ref_inner(xc, p, "_c")
    out_c_b = ref_inner(xc.flip([-1]), p, "_c_b")
    out_c = out_c + out_c_b.flip([-1])
    d_inner = out_c.shape[1]
    cls, out_c = out_c[:, :, pos:pos + 1], torch.cat([out_c[:, :, :pos], out_c[:, :, pos + 1:]], dim=-1)
    out_c = out_c.reshape(bsz, d_inner, side, side).permute(0, 1, 3, 2).reshape(bsz, d_inner, -1)
    out_c = torch.cat([out_c[:, :, :pos], cls, out_c[:, :, pos:]], dim=-1)
    out = out + out_b.flip([-1])
    return torch.einsum("bdl,ed->ble", (out + out_c) / 4.0, p["out_proj.weight"])


def ref_layers(x, sd, four_way):
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        ln = lambda t, name: F.layer_norm(t, t.shape[-1:], p[name + ".weight"], p[name + ".bias"], 1e-5)  # noqa
        mixer = {k[len("mixer."):]: v for k, v in p.items() if k.startswith("mixer.")}
        x = x + ref_mixer(ln(x, "norm1"), mixer, four_way)
        h = ln(x, "norm2")
        mlp = F.silu(F.linear(h, p["mlp.w1.weight"], p["mlp.w1.bias"])) * F.linear(h, p["mlp.w2.weight"], p["mlp.w2.bias"])
        x = x + F.linear(mlp, p["mlp.w3.weight"], p["mlp.w3.bias"])
    return x


def ref_forward_features(images, sd):
    """The released ARM (stages 2-3): patches, the class token at M//2, positions, blocks, norm_f."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat([x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]], dim=1) + sd["pos_embed"]
    x = ref_layers(x, sd, True)
    return F.layer_norm(x, x.shape[-1:], sd["norm_f.weight"], sd["norm_f.bias"], 1e-5)


def ref_stage1_last_feature(images, sd):
    """The released stage-1 encoder's last feature: patches + positions, rearranged into 4x4 clusters, the
    last cluster dropped, one-way blocks, norm_4."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]
    b, n, c = x.shape
    side = int(math.sqrt(n))
    x = x.reshape(b, side // 4, 4, side // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, 16, c)
    x = x[:, :-1].reshape(b, -1, c)
    x = ref_layers(x, sd, False)
    return F.layer_norm(x, x.shape[-1:], sd["norm_4.weight"], sd["norm_4.bias"], 1e-5)


def rel_err(ours, ref):
    return float((ours.double() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------- the tests

OLD_ENCODER_KEYS = ["image_size", "patch_size", "in_chans", "dim", "depth", "d_state", "d_conv", "expand",
                    "mlp_ratio", "scan", "dt_rank", "norm_eps", "stem"]


def test_existing_configs_and_payloads_are_unchanged():
    """No run hash moves: the new fields leave a config's dict while they hold the old default."""
    assert list(EncoderConfig().to_dict()) == OLD_ENCODER_KEYS
    tiny = get_preset("tiny")
    assert tiny.arm.to_dict()["encoder"] == {
        "image_size": 128, "patch_size": 16, "in_chans": 1, "dim": 128, "depth": 8, "d_state": 16, "d_conv": 4,
        "expand": 1, "mlp_ratio": 4.0, "scan": "1-way", "dt_rank": None, "norm_eps": 1e-5, "stem": "conv"}
    assert list(tiny.arm.to_dict()) == ["encoder", "decoder_dim", "decoder_heads", "feature_layers", "cluster",
                                        "mlp_ratio"]
    released = EncoderConfig(arch="released", scan="4-way", mlp_hidden=64)
    assert released.to_dict()["arch"] == "released" and released.to_dict()["mlp_hidden"] == 64
    assert EncoderConfig(**released.to_dict()) == released


def test_released_parameter_names_are_the_released_ones():
    enc = VisionMamba(EncoderConfig(arch="released", scan="4-way", image_size=32, patch_size=8, dim=32, depth=1,
                                    in_chans=3, d_state=8))
    assert set(to_released_names(enc.state_dict())) == set(released_state(depth=1))
    assert enc.class_token_index == 8
    one_way = VisionMamba(EncoderConfig(arch="released", image_size=32, patch_size=8, dim=32, depth=1, in_chans=3,
                                        d_state=8))
    assert one_way.pos_embed.requires_grad is False
    assert set(to_released_names(one_way.state_dict())) == (set(released_state(depth=1, four_way=False))
                                                            | {"norm_f.weight", "norm_f.bias"})


@pytest.mark.parametrize("path", ["auto", "torch", "per-direction"])
def test_each_scan_path_matches_the_released_forward(path, monkeypatch):
    """The compiled CPU scan (auto, where it built), the pure-PyTorch path, and the per-direction loop with
    gathers (the structure the CUDA/Triton path runs) all give the released v3 forward pass."""
    if path == "torch":
        monkeypatch.setenv(SCAN_ENV, "torch")
    sd = released_state(dim=32, depth=2, grid=4, patch=8, seed=3)
    enc = load_encoder(sd)
    if path == "per-direction":
        for block in enc.blocks:
            block.mixer.merge_directions = False
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = enc(images).tokens
    assert ours.shape == (2, 17, 32)
    assert rel_err(ours, ref_forward_features(images, sd)) < 1e-4


@pytest.mark.skipif(not compiled_available(), reason="the compiled scan did not build here")
def test_compiled_released_mixer_gradients_match_the_pure_path(monkeypatch):
    """Training through the compiled fused core with the held class token: the same gradients as the pure path."""
    torch.manual_seed(0)
    enc = load_encoder(released_state(dim=16, depth=1, grid=4, patch=8, d_state=4, seed=5)).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for impl in ("compiled", "torch"):
        monkeypatch.setenv(SCAN_ENV, impl)
        enc.zero_grad()
        out = enc(images).tokens
        (out * out.detach().cos()).sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_file_format_loads(stage, tmp_path):
    if stage == 1:
        sd = stage1_file_model(grid=8, seed=2)
        path = save_stage(tmp_path / "pretrain.pth", 1, sd)
        enc = load_encoder(path)
        cfg = enc.config
        assert (cfg.scan, cfg.class_token, cfg.image_size, cfg.in_chans) == ("1-way", False, 64, 3)
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = enc.forward_tokens(enc.embed(images)[:, cluster_order(8, 4)[:-16]]).tokens
        assert rel_err(ours, ref_stage1_last_feature(images, sd)) < 1e-4
        return
    sd = released_state(dim=32, depth=2, grid=4, patch=8, hidden=48, dt_rank=3, seed=stage)
    enc = load_encoder(save_stage(tmp_path / f"stage{stage}.pth", stage, sd))
    assert (enc.config.mlp_hidden, enc.config.dt_rank, enc.config.image_size) == (48, 3, 32)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(enc(images).tokens, ref_forward_features(images, sd)) < 1e-4


def test_stage1_to_stage2_follows_the_released_stage2_start(tmp_path):
    sd = stage1_file_model(grid=8, seed=4)
    path = save_stage(tmp_path / "pretrain.pth", 1, sd)
    cls = torch.randn(1, 1, 32)
    two = stage1_to_stage2(path, image_size=80, cls_token=cls)      # 8x8 -> 10x10 grid
    # as the released stage 2 builds it: directions copied, positions bicubic, a zero slot at N//2
    assert torch.equal(two["layers.1.mixer.A_c_b_log"], sd["layers.1.mixer.A_log"])
    assert torch.equal(two["layers.0.mixer.conv1d_c.weight"], sd["layers.0.mixer.conv1d.weight"])
    assert torch.equal(two["layers.0.mixer.D_b"], sd["layers.0.mixer.D"])
    grid = sd["pos_embed"].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.equal(two["pos_embed"][:, 50], torch.zeros(1, 32))
    assert torch.equal(torch.cat([two["pos_embed"][:, :50], two["pos_embed"][:, 51:]], 1), pos)
    assert not any("dec" in k or k.startswith(("norm_", "ar_")) for k in two if not k.startswith("norm_f"))
    enc = load_encoder(two)
    assert enc.config.image_size == 80 and enc.config.scan == "4-way"
    images = torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(enc(images).tokens, ref_forward_features(images, two)) < 1e-4


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_missing_key_is_refused_by_name(stage, tmp_path):
    sd = stage1_file_model(seed=1) if stage == 1 else released_state(seed=1)
    gone = "norm_4.bias" if stage == 1 else "layers.1.mlp.w3.bias"
    del sd[gone]
    path = save_stage(tmp_path / "ckpt.pth", stage, sd)
    prefix = "" if stage == 1 else "visual_encoder."
    with pytest.raises(ReleasedCheckpointError, match=rf"ckpt\.pth.*missing key '{prefix}{gone}'"):
        load_encoder(path)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_unexpected_key_is_refused_by_name(stage, tmp_path):
    sd = stage1_file_model(seed=1) if stage == 1 else released_state(seed=1)
    sd["layers.0.mixer.A_d_log"] = torch.zeros(32, 8)
    path = save_stage(tmp_path / "ckpt.pth", stage, sd)
    with pytest.raises(ReleasedCheckpointError, match=r"ckpt\.pth.*unexpected key '.*layers\.0\.mixer\.A_d_log'"):
        load_encoder(path)
    if stage == 3:
        obj = torch.load(path, weights_only=False)
        obj["model"]["lm_head.weight"] = torch.zeros(2, 2)
        torch.save(obj, path)
        with pytest.raises(ReleasedCheckpointError, match=r"unexpected keys? .*'lm_head\.weight'"):
            load_encoder(path)


def test_base_size_stage3_file_matches_the_released_forward(tmp_path):
    """Base width and depth (768 x 12, MLP 2048, dt_rank 48, d_state 16) on a 4x4 grid (64 px) to keep the
    reference loop short; the shapes of every parameter but pos_embed are the released Base's."""
    sd = released_state(dim=768, depth=12, grid=4, patch=16, d_state=16, seed=7)
    enc = load_encoder(save_stage(tmp_path / "base.pth", 3, sd))
    cfg = enc.config
    assert (cfg.dim, cfg.depth, cfg.mlp_width, cfg.dt_rank, cfg.mlp_hidden) == (768, 12, 2048, None, None)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(enc(images).tokens, ref_forward_features(images, sd)) < 1e-4


@pytest.mark.parametrize("name,dim,depth,hidden", [("base", 768, 12, 2048), ("large", 1024, 24, 2730)])
def test_released_presets_have_the_released_shapes(name, dim, depth, hidden):
    from cxpmrg_lib.presets import released_encoder
    with torch.device("meta"):
        enc = VisionMamba(released_encoder(name))
        one = VisionMamba(released_encoder(name, stage=1))
    names = to_released_names(enc.state_dict())
    assert names["pos_embed"].shape == (1, 197, dim) and names["cls_token"].shape == (1, 1, dim)
    assert names[f"layers.{depth - 1}.mlp.w1.weight"].shape == (hidden, dim)
    assert names["layers.0.mixer.dt_proj_c_b.weight"].shape == (dim, math.ceil(dim / 16))
    assert to_released_names(one.state_dict())["pos_embed"].shape == (1, 144, dim)
