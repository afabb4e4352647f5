"""The stage-1 autoregressive head: cluster order, masking, loss."""
import pytest
import torch

from cxpmrg_lib.models.arm import ARMConfig, ARMPretrainer, cluster_order, normalise_patches, patchify, unpatchify
from cxpmrg_lib.models.vision_mamba import EncoderConfig


def tiny_arm(image_size=64, patch=8, **kw):
    return ARMConfig(encoder=EncoderConfig(image_size=image_size, patch_size=patch, dim=32, depth=4),
                     decoder_dim=32, decoder_heads=2, feature_layers=(1, 2, 3, 4), **kw)


def test_cluster_order_lists_4x4_blocks_row_major():
    order = cluster_order(8, 4)
    assert sorted(order.tolist()) == list(range(64))
    assert order[:16].tolist() == [r * 8 + c for r in range(4) for c in range(4)]
    assert order[16:20].tolist() == [4, 5, 6, 7]          # cluster 2 starts at the top right
    assert order[32].item() == 32                          # cluster 3 starts at row 4, column 0


@pytest.mark.parametrize("size,patch,clusters", [(128, 16, 4), (192, 16, 9), (64, 8, 4)])
def test_cluster_counts(size, patch, clusters):
    cfg = ARMConfig(encoder=EncoderConfig(image_size=size, patch_size=patch, dim=32, depth=4),
                    decoder_dim=32, decoder_heads=2, feature_layers=(1, 2, 3, 4))
    assert cfg.num_clusters == clusters


def test_grid_not_divisible_by_four_is_refused():
    with pytest.raises(ValueError, match="clusters"):
        ARMConfig(encoder=EncoderConfig(image_size=96, patch_size=16, dim=32, depth=4), feature_layers=(1,))
    with pytest.raises(ValueError, match="1-way"):
        ARMConfig(encoder=EncoderConfig(image_size=64, patch_size=16, dim=32, depth=4, scan="4-way"),
                  feature_layers=(1,))


def test_patchify_roundtrip_and_normalisation():
    x = torch.randn(2, 1, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 64)
    assert torch.equal(unpatchify(p, 8), x)
    assert torch.equal(p[0, 1], x[0, 0, :8, 8:16].reshape(-1))
    n, mean, std = normalise_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(n * std + mean, p, atol=1e-5)


def test_no_cluster_sees_its_own_pixels():
    """Changing the pixels of cluster j changes only the predictions of clusters after j."""
    torch.manual_seed(0)
    model = ARMPretrainer(tiny_arm()).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        base = model.predict(x)
        for j in range(4):                               # 0-based cluster; each is 32x32 px here
            x2 = x.clone()
            r, c = divmod(j, 2)
            x2[:, :, 32 * r: 32 * (r + 1), 32 * c: 32 * (c + 1)] += torch.randn(2, 1, 32, 32)
            diff = (model.predict(x2) - base).abs().reshape(2, 3, 16, -1).amax(dim=(0, 2, 3))
            # prediction slot k predicts cluster k+1 (0-based)
            for k in range(3):
                if k + 1 <= j:
                    assert diff[k] == 0, f"cluster {k + 1} prediction saw cluster {j}"
                else:
                    assert diff[k] > 1e-4, f"cluster {k + 1} prediction ignores cluster {j}"


def test_loss_is_mse_on_normalised_pixels_and_drops_when_trained():
    torch.manual_seed(0)
    model = ARMPretrainer(tiny_arm())
    # images with a smooth, predictable structure: horizontal gradients of random slope
    slope = torch.rand(16, 1, 1, 1) + 0.5
    x = (torch.linspace(-1, 1, 64)[None, None, None, :] * slope).expand(-1, 1, 64, -1).contiguous()
    out = model(x)
    target, _, _ = model.targets(x)
    assert torch.allclose(out["loss"], ((out["pred"] - target) ** 2).mean(), atol=1e-6)
    first = out["loss"].item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_reconstruct_leaves_the_context_cluster_blank():
    model = ARMPretrainer(tiny_arm())
    rec = model.reconstruct(torch.randn(2, 1, 64, 64))
    assert set(rec) == {"input", "target", "prediction"}
    assert rec["prediction"].shape == (2, 1, 64, 64)
    assert torch.isnan(rec["prediction"][:, :, :32, :32]).all()
    assert torch.isfinite(rec["prediction"][:, :, 32:, :]).all()
    assert torch.allclose(rec["target"][:, :, 32:], rec["input"][:, :, 32:], atol=1e-4)
