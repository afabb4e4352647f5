"""Stage-2 pieces: study pooling over views, the CLIP loss, retrieval recall."""
import math

import torch
from torch import nn

from cxpmrg_lib.models.contrastive import ContrastiveModel, clip_loss, retrieval_recall, study_features
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba


class BagOfWords(nn.Module):
    output_dim = 16

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)

    def forward(self, input_ids, attention_mask):
        m = attention_mask[..., None].float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)


def encoder():
    return VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=16, depth=1, scan="4-way"))


def test_study_features_average_real_views_only():
    torch.manual_seed(0)
    enc = encoder().eval()
    x = torch.randn(2, 2, 1, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    f = study_features(enc, x, mask)
    with torch.no_grad():
        a, b = enc(x[0]).pooled, enc(x[1, :1]).pooled
    assert torch.allclose(f[0], a.mean(0), atol=1e-5)
    assert torch.allclose(f[1], b[0], atol=1e-5)          # the padding view is ignored


def test_clip_loss_is_log_n_for_uninformative_and_small_for_matched():
    n = 8
    e = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    same = torch.ones(n, 4) / 2
    assert math.isclose(clip_loss(same, same, torch.tensor(0.0)).item(), math.log(n), rel_tol=1e-5)
    eye = torch.eye(n)
    assert clip_loss(eye, eye, torch.tensor(math.log(100.0))).item() < 1e-3
    assert clip_loss(e, e.roll(1, 0), torch.tensor(math.log(100.0))).item() > 1.0


def test_model_trains_to_pair_images_and_texts():
    torch.manual_seed(0)
    model = ContrastiveModel(encoder(), BagOfWords(), proj_dim=16)
    assert math.isclose((-model.logit_scale).exp().item(), 0.07, rel_tol=1e-6)
    images = torch.randn(6, 1, 1, 32, 32)
    ids = torch.arange(6)[:, None].repeat(1, 3) * 3 + torch.arange(3)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(images, ids, mask)["loss"].item()
    for _ in range(60):
        loss = model(images, ids, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    with torch.no_grad():
        r = retrieval_recall(model.embed_images(images), model.embed_texts(ids, mask))
    assert r["i2t_R@1"] == 100.0 and r["t2i_R@1"] == 100.0


def test_retrieval_recall_counts_and_groups():
    img = torch.eye(4)
    txt = torch.eye(4)[[1, 0, 2, 3]]                       # items 0 and 1 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t_R@1"] == 50.0 and r["i2t_R@2"] == 100.0 and r["t2i_R@1"] == 50.0
    # when items 0 and 1 carry the same report text, retrieving either is a hit
    r = retrieval_recall(img, txt, ks=(1,), groups=["normal", "normal", "effusion", "edema"])
    assert r["i2t_R@1"] == 100.0
