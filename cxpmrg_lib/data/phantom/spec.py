"""What a phantom study is: the findings, the normal anatomy and its sampling.

A study is described by a `StudySpec` (anatomy + findings); `render` draws it.
These plain, frozen descriptions are kept apart from the drawing code so that the
report writer and the IU mapping can use them without pulling in any pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxpmrg_lib.data.observations import CHEXPERT_LABELS

OBSERVATIONS = tuple(CHEXPERT_LABELS[:13])  # everything but "No Finding" can be drawn
SIDES = ("right", "left", "bilateral")
ZONES = ("apex", "upper", "middle", "lower", "base")
# Severity words map to one magnitude scale used by every drawer.
SEVERITY_SCALE = {"": 2.0, "mild": 1.0, "small": 1.0, "moderate": 2.0, "large": 3.0, "severe": 3.0}
DEVICE_KINDS = ("ett", "ng_tube", "central_line", "picc", "pacemaker", "sternal_wires", "chest_tube")
# Lung-local height fraction t (0 = apex, 1 = costophrenic angle) of each zone's centre.
ZONE_T = {"apex": 0.07, "upper": 0.28, "middle": 0.52, "lower": 0.76, "base": 0.9, "": 0.6}


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality. `uncertain` marks a finding the report hedges (label -1.0)."""

    observation: str
    side: str = ""
    zone: str = ""
    severity: str = ""
    kind: str = ""
    uncertain: bool = False


@dataclass(frozen=True)
class Anatomy:
    """Per-study normal anatomy and acquisition; sampled by `sample_anatomy`."""

    view: str = "PA"            # "PA" or "AP" (AP: portable, magnified heart, higher domes)
    sex: str = "Male"
    ctr: float = 0.44           # cardiothoracic ratio of the normal heart
    apex_y: float = 0.22
    dome_r: float = 1.40        # peak of the right hemidiaphragm
    dome_l_offset: float = 0.05  # the left dome sits lower
    cp_depth: float = 0.14      # costophrenic angle below the dome peak
    lung_lat: float = 0.82      # lateral lung edge at the base
    med_w: float = 0.14         # half-width of the upper mediastinum
    body_w: float = 0.95
    rib_y0: float = 0.30
    rib_step: float = 0.128
    rot_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    zoom: float = 1.0
    gain: float = 2.6
    gamma: float = 1.0
    noise: float = 0.02
    texture_seed: int = 0


@dataclass(frozen=True)
class StudySpec:
    anatomy: Anatomy = field(default_factory=Anatomy)
    findings: tuple[Finding, ...] = ()

    def has(self, observation: str) -> bool:
        return any(f.observation == observation for f in self.findings)


# ----------------------------------------------------------------------------- sampling
def sample_anatomy(rng: np.random.Generator, view: str = "PA", sex: str = "Male",
                   base: Anatomy | None = None) -> Anatomy:
    """Normal anatomy for one study; `base` (the patient's) is jittered slightly if given."""
    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    if base is None:
        shape = dict(ctr=u(0.38, 0.47), apex_y=u(0.19, 0.26), dome_r=u(1.34, 1.46),
                     dome_l_offset=u(0.02, 0.08), cp_depth=u(0.11, 0.17), lung_lat=u(0.78, 0.86),
                     med_w=u(0.12, 0.155), body_w=u(0.9, 0.99), rib_y0=u(0.27, 0.33),
                     rib_step=u(0.118, 0.136))
    else:
        j = lambda v, s: float(v + rng.normal(0, s))  # noqa: E731
        shape = dict(ctr=j(base.ctr, 0.005), apex_y=j(base.apex_y, 0.005), dome_r=j(base.dome_r, 0.02),
                     dome_l_offset=base.dome_l_offset, cp_depth=base.cp_depth, lung_lat=base.lung_lat,
                     med_w=base.med_w, body_w=base.body_w, rib_y0=j(base.rib_y0, 0.004),
                     rib_step=base.rib_step)
    if view == "AP":  # portable: poorer inspiration and magnified heart
        shape["dome_r"] -= 0.05
        shape["ctr"] += 0.03
    return Anatomy(view=view, sex=sex, rot_deg=u(-3.5, 3.5), shift_x=u(-0.04, 0.04), shift_y=u(-0.04, 0.04),
                   zoom=u(0.95, 1.05), gain=u(1.9, 2.5), gamma=u(0.85, 1.2), noise=u(0.008, 0.025),
                   texture_seed=int(rng.integers(2**31)), **shape)
