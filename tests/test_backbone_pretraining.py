"""Backbone pre-training of the benchmark's from-scratch systems: targets, and that it teaches the findings."""
import numpy as np
import pytest
import torch

from cxpmrg_lib.models.zoo.common import SmallResNet, pool_views
from cxpmrg_lib.stages.backbone import finding_targets, pretrain_backbone, shared_pretrain_backbone, weights_digest
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

EFFUSION = CHEXPERT_LABELS.index("Pleural Effusion")
NO_FINDING = CHEXPERT_LABELS.index("No Finding")


class _Studies:
    """StudyDataset's surface: items with one noisy 32x32 view; an effusion is a brighter lower-left block."""

    def __init__(self, n: int = 48, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.sick = rng.random(n) < 0.5
        # a nuisance that dominates a random network's features: each image's own brightness and contrast
        self.images = (rng.normal(0, 1, (n, 1, 1, 1, 1)) + rng.uniform(0.5, 2, (n, 1, 1, 1, 1))
                       * rng.normal(0, 1, (n, 1, 1, 32, 32))).astype(np.float32)
        self.images[self.sick, :, :, 18:30, 2:14] += 1.0
        self.labels = np.full((n, 14), np.nan, dtype=np.float32)
        self.labels[self.sick, EFFUSION] = 1.0
        self.labels[~self.sick, NO_FINDING] = 1.0
        self.reports = ["small left pleural effusion ." if s else "the lungs are clear ." for s in self.sick]

    def __len__(self):
        return len(self.reports)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.images[i]), "image_mask": torch.ones(1, dtype=torch.bool),
                "report": self.reports[i], "labels": torch.from_numpy(self.labels[i].copy()), "study_id": str(i)}


def test_targets_count_positive_and_uncertain_and_fill_unlabelled_studies_from_the_labeller():
    studies = _Studies(4)
    studies.labels[0] = np.nan                            # no label file row: the rule labeller reads the report
    studies.reports[0] = "Large right pleural effusion."
    studies.labels[1, EFFUSION] = -1.0                    # uncertain counts (U-ones)
    studies.labels[2, EFFUSION] = 0.0                     # a negation does not
    t = finding_targets(studies)
    assert t.shape == (4, 14) and set(t.unique().tolist()) <= {0.0, 1.0}
    assert t[0, EFFUSION] == 1 and t[1, EFFUSION] == 1 and t[2, EFFUSION] == 0


def _separation(backbone, studies) -> float:
    """Fisher ratio of the pooled features between sick and healthy studies (projected on the mean gap)."""
    backbone.eval()
    with torch.no_grad():
        items = [studies[i] for i in range(len(studies))]
        images = torch.stack([b["image"] for b in items])
        mask = torch.stack([b["image_mask"] for b in items])
        f = pool_views(backbone, images, mask).mean(1)
    sick = torch.from_numpy(studies.sick)
    gap = f[sick].mean(0) - f[~sick].mean(0)
    z = f @ (gap / gap.norm())
    return float((z[sick].mean() - z[~sick].mean()) ** 2 / (z[sick].var() + z[~sick].var()))


@pytest.mark.parametrize("objective", ["labels", "contrastive"])
def test_pretraining_teaches_the_backbone_the_finding(objective, tmp_path):
    from cxpmrg_lib.presets import get_preset

    studies = _Studies()
    torch.manual_seed(0)
    backbone = SmallResNet(dim=32, widths=(8, 16))
    keys = set(backbone.state_dict())
    before = _separation(backbone, studies)
    backbone.train()
    record = pretrain_backbone(backbone, backbone, studies, objective, steps=40, batch_size=16,
                               text_config=get_preset("tiny").text, work_dir=tmp_path, desc="test")
    assert record["objective"] == objective and record["steps"] == 40 and record["last_loss"] < record["first_loss"]
    assert set(backbone.state_dict()) == keys             # the head / text side is not left on the backbone
    assert backbone.training                              # the mode it came in with
    assert _separation(backbone, studies) > 2 * before
    backbone.eval()
    pretrain_backbone(backbone, backbone, studies, objective, steps=1, text_config=get_preset("tiny").text,
                      work_dir=tmp_path / "again")
    assert not backbone.training


def test_backbones_from_the_same_start_share_one_pretraining(tmp_path):
    """Two systems whose backbones start from the same weights get one pre-training: the second loads the
    first's result (equal weights, the first's record); another start or another step count trains anew."""
    studies = _Studies(16)

    def fresh(seed=0):
        torch.manual_seed(seed)
        return SmallResNet(dim=16, widths=(8,))

    first, second, other = fresh(), fresh(), fresh(1)
    assert weights_digest(first) == weights_digest(second) != weights_digest(other)
    a = shared_pretrain_backbone(tmp_path, first, studies, steps=3, desc="first")
    b = shared_pretrain_backbone(tmp_path, second, studies, steps=3, desc="second")
    assert not a["reused"] and b["reused"] and b["trained_by"] == "first" and b["seconds"] == a["seconds"]
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert weights_digest(first) != weights_digest(fresh())      # it was trained
    c = shared_pretrain_backbone(tmp_path, other, studies, steps=3, desc="other")
    d = shared_pretrain_backbone(tmp_path, fresh(), studies, steps=2, desc="shorter")
    assert not c["reused"] and not d["reused"] and len({a["folder"], c["folder"], d["folder"]}) == 3


def test_unknown_objective_and_nothing_to_learn_are_refused():
    studies = _Studies(8)
    with pytest.raises(ValueError, match="objective must be one of"):
        pretrain_backbone(SmallResNet(dim=16, widths=(8,)), lambda x: x, studies, "imagenet")
    studies.labels[:] = 0.0
    with pytest.raises(ValueError, match="nothing to learn"):
        pretrain_backbone(SmallResNet(dim=16, widths=(8,)), SmallResNet(dim=16, widths=(8,)), studies, steps=1)
    with pytest.raises(ValueError, match="text encoder config"):
        backbone = SmallResNet(dim=16, widths=(8,))
        pretrain_backbone(backbone, backbone, _Studies(8), "contrastive", steps=1)


def test_the_step_takes_a_vision_mamba_encoder_too_and_stage3_checks_the_option():
    """The matched MambaXray-VL row: the same step on the 4-way encoder's tokens, before stage 3."""
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
    from cxpmrg_lib.stages.report import FinetuneConfig

    torch.manual_seed(0)
    encoder = VisionMamba(EncoderConfig(image_size=32, patch_size=8, dim=16, depth=1, scan="4-way"))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    record = pretrain_backbone(encoder, lambda x: encoder(x).tokens, _Studies(8), "labels", steps=2, batch_size=4)
    assert record["steps"] == 2 and any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="encoder_pretraining must be"):
        FinetuneConfig(dataset_root="x", encoder_pretraining="imagenet")


def test_token_encoder_holds_its_backbone_once():
    """ReportModel's checkpoints load with strict names: the wrapped network appears under one name only."""
    from cxpmrg_lib.stages.backbone import TokenEncoder

    backbone = SmallResNet(dim=16, widths=(8,))
    wrapped = TokenEncoder(backbone, 16, 32)
    assert all(k.startswith("backbone.") for k in wrapped.state_dict())
    assert wrapped(torch.randn(2, 1, 32, 32)).tokens.shape == (2, 64, 16) and wrapped.config.image_size == 32
    assert set(TokenEncoder(backbone, 16, extract=backbone).state_dict()) == set(wrapped.state_dict())
    with pytest.raises(TypeError):
        TokenEncoder(backbone, 16, extract=SmallResNet(dim=16, widths=(8,)))
