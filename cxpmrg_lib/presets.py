"""Model sizes: `tiny` trains on a laptop CPU in minutes; `base` and `large` are the paper's.

A preset fixes the architecture (what a checkpoint must match) and the default
training settings of each stage; a stage config can override the training
settings but not the architecture.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from cxpmrg_lib.models.arm import ARMConfig
from cxpmrg_lib.models.vision_mamba import EncoderConfig

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    arm: ARMConfig
    stage1: dict = field(default_factory=dict)   # TrainConfig defaults for autoregressive pre-training
    note: str = ""

    @property
    def encoder(self) -> EncoderConfig:
        return self.arm.encoder


PRESETS: dict[str, Preset] = {
    # 128 px / patch 16 = 8x8 grid = 4 clusters; 8 blocks of width 128 (about 2 M encoder parameters).
    "tiny": Preset(
        name="tiny",
        arm=ARMConfig(encoder=EncoderConfig(image_size=128, patch_size=16, dim=128, depth=8),
                      decoder_dim=128, decoder_heads=4, feature_layers=(2, 4, 6, 8)),
        stage1=dict(batch_size=32, lr=1.5e-3, weight_decay=0.05, epochs=8, min_lr_ratio=0.05, clip_grad=1.0),
        note="CPU default; phantom data",
    ),
    # The paper's sizes: 192 px / patch 16 = 12x12 grid = 9 clusters; decoder width 512, 4 blocks.
    "base": Preset(
        name="base",
        arm=ARMConfig(encoder=EncoderConfig(image_size=192, patch_size=16, dim=768, depth=12),
                      decoder_dim=512, decoder_heads=16, feature_layers=(6, 8, 10, 12)),
        stage1=dict(batch_size=256, lr=1.5e-4, weight_decay=0.05, epochs=100, min_lr_ratio=0.01),
        note="paper size (768 x 12), GPU",
    ),
    "large": Preset(
        name="large",
        arm=ARMConfig(encoder=EncoderConfig(image_size=192, patch_size=16, dim=1024, depth=24),
                      decoder_dim=512, decoder_heads=16, feature_layers=(12, 16, 20, 24)),
        stage1=dict(batch_size=256, lr=1.5e-4, weight_decay=0.05, epochs=100, min_lr_ratio=0.01),
        note="paper size (1024 x 24), GPU",
    ),
}


def get_preset(name: str) -> Preset:
    """A deep copy of the named preset (callers may change its configs freely)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
