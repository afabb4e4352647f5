"""Drawing of the synthetic chest radiographs (the phantom's pixels).

A study is described by a `StudySpec` (anatomy + findings); `render_study` turns it
into an 8-bit greyscale image. The picture is built as a density map (soft tissue,
bone, metal add; aerated lung subtracts) in resolution-free coordinates and mapped
to brightness like an exposure, so one spec renders alike at 128 or 1024 px.

The parts live in short modules, each importing only those before it:
spec (what a study is) <- canvas (grid, fields, geometry, coordinates)
<- acquire (exposure, positioning, grain) <- findings (frontal
findings, ribs, devices) <- lateral (`render_lateral`) <- this module
(`render_study`, and the names other modules import from here).

Everything is vectorised numpy on row/column slices; no per-pixel Python loops.
The only randomness inside `render_study` is drawn from its `rng` in a fixed
order at the start, so the same spec rendered with and without one finding
differs only where that finding is drawn.
"""
from __future__ import annotations

import numpy as np

from .acquire import _acquire, _start_view
from .canvas import (_BONE, _LUNG_AIR, _METAL, _TISSUE, _clip, _frontal_static,
                             _hilar_fields, _ramp_, _shoulder_girdle)
from .findings import _draw_device, _draw_lung_finding, _draw_ribs
from .spec import StudySpec

# Re-exported: the public names the rest of the package imports from here, and the
# helpers the tests check (the code lives in spec / canvas / acquire / lateral).
from .acquire import _affine, _affine_to, _upsample2  # noqa: F401
from .canvas import _bezier, _canvas  # noqa: F401
from .lateral import render_lateral  # noqa: F401
from .spec import (DEVICE_KINDS, OBSERVATIONS, SEVERITY_SCALE, SIDES, ZONE_T, ZONES,  # noqa: F401
                           Anatomy, Finding, sample_anatomy)

__all__ = ["DEVICE_KINDS", "OBSERVATIONS", "SEVERITY_SCALE", "SIDES", "ZONE_T", "ZONES", "Anatomy", "Finding",
           "StudySpec", "render_lateral", "render_study", "sample_anatomy"]


def render_study(spec: StudySpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal (PA/AP) radiograph of `spec` as a (size, size) uint8 array."""
    a = spec.anatomy
    # all randomness first, in a fixed order (see the module docstring)
    S, cv, grain, fields, fr, th = _start_view(spec, size, rng)
    x, y, ax = cv.x, cv.y, cv.ax
    soft = 1.5 * cv.px

    # --- body: soft tissue thickness with neck and shoulders
    bw = np.where(y < 0.06, 0.26, np.minimum(a.body_w, 0.26 + (a.body_w - 0.26) * _clip((y - 0.06) / 0.26, 0, 1) ** 0.5))
    bw = bw.astype(np.float32)
    # tissue * (0.12 + 0.88 sqrt(1 - (|x| / bw)^2)) * ramp(bw - |x|, 3 px)
    u = np.subtract.outer(bw * bw, ax * ax)
    u *= (1.0 / (bw * bw))[:, None]
    np.maximum(u, 0.0, out=u)
    np.sqrt(u, out=u)
    u *= 0.88 * _TISSUE
    u += 0.12 * _TISSUE
    k = 1.0 / (3 * cv.px)
    D = np.subtract.outer(bw * k + 0.5, ax * k)
    _clip(D, 0.0, 1.0, out=D)
    D *= u
    D += _frontal_static(S)[0]  # trachea and hila
    # arms / humeral heads at the upper corners
    for s in (-1, 1):
        cv.blob(D, s * (a.body_w - 0.02), 0.26, 0.09, 0.12, 0.12, soft=0.05)
    if a.sex == "Female":  # breast shadows over the lower lungs
        for s in (-1, 1):
            cv.blob(D, s * 0.55, th.dome[("right", "left")[s > 0]] - 0.02, 0.34, 0.24, 0.10, soft=0.12)

    # --- lungs (per side, on that half of the columns)
    air = np.empty((S, S), np.float32)
    for side in ("right", "left"):
        cs = cv.side_cols(side)
        axs = ax[cs]
        t = th.t(side, y)
        xc, hw = th.centre_hw(side, t)
        hw = np.where(t > 0, hw, -1.0).astype(np.float32)  # nothing above the apex
        inside = np.abs(np.subtract.outer(xc, axs))
        np.subtract(hw[:, None], inside, out=inside)
        _ramp_(inside, soft)
        # hemidiaphragm dome: peak at |x| = 0.42, falling to the costophrenic angle laterally
        P, C, L = th.dome[side], th.cp[side], th.lat[side]
        lat = np.maximum((axs - 0.42) / (L - 0.42), 0.0)
        med = np.maximum((0.42 - axs) / 0.34, 0.0)
        ydome = P + (C - P) * lat ** 2 + 0.10 * med ** 2
        inside *= _ramp_(np.subtract.outer(-y, -ydome), soft)
        # mediastinum (+ aortic knob on the patient's left)
        mw = np.full_like(y, a.med_w + th.mediastinum_extra)
        mw = np.where(y < 0.25, mw * 0.8, mw)
        if side == "left":
            knob = 0.075 + 0.3 * th.mediastinum_extra
            dyk = (y - 0.64) / (knob * 1.1)
            mw = np.maximum(mw, (0.15 + th.mediastinum_extra * 0.8 + knob * np.sqrt(_clip(1 - dyk ** 2, 0, 1))) * (np.abs(dyk) < 1))
        inside *= _ramp_(np.subtract.outer(-mw.astype(np.float32), -axs), soft)
        air[:, cs] = inside
    # heart cuts into the lungs and adds a little density
    rs = cv.rows(th.hy - th.hry - 0.05, th.hy + th.hry + 0.05)
    hcs = cv.cols(th.hx - th.hrx - 2 * soft, th.hx + th.hrx + 2 * soft)
    hx_ = (x[hcs] - th.hx) / th.hrx
    hy_ = (y[rs] - th.hy) / th.hry
    # flatter right border, rounder left apex: skew the ellipse slightly
    r = np.add.outer(hy_, 0.35 * hx_ * (hx_ > 0))
    r *= r
    r += (hx_ * hx_)[None, :]
    np.sqrt(r, out=r)
    # 1 - ramp((1 - r) * hrx, soft) = clip(kh r - kh + 0.5) with kh = hrx / soft
    kh = th.hrx / soft
    r *= kh
    r += 0.5 - kh
    _clip(r, 0.0, 1.0, out=r)
    air[rs, hcs] *= r
    # gastric air bubble under the left hemidiaphragm
    cv.blob(D, 0.45, th.dome["left"] + 0.12, 0.13, 0.06, -0.12, soft=0.03)

    # --- lung markings radiating from the hila: (0.5 ridge(vessel) + 0.5 radial near) * fall-off
    hf = _hilar_fields(S)
    # radial = (0.5 + 0.5 cos(22 ang + 3 tex)) ** 10, with cos(a + b) = cos a cos b - sin a sin b
    rad = hf["c22"] * fields.get(fields.TEX, "cos3")
    rad -= hf["s22"] * fields.get(fields.TEX, "sin3")
    rad *= 0.5
    rad += 0.5
    r2 = rad * rad
    np.multiply(r2, r2, out=rad)   # ^4
    rad *= rad                     # ^8
    rad *= r2                      # ^10
    rad *= hf["near"]
    marks = fields.get(fields.VESSEL, "ridge") * 0.5
    marks += rad
    marks *= hf["fall"]
    del rad, r2

    # --- findings that change lung aeration (before bones so bones overlay them)
    extra = np.zeros((S, S), np.float32)
    ptx_rim = np.zeros((S, S), np.float32) if spec.has("Pneumothorax") else None
    for i, f in enumerate(spec.findings):
        _draw_lung_finding(f, cv, th, air, extra, ptx_rim, fields, fr[i % 16])

    # --- bones
    bone = _draw_ribs(cv, th, spec.findings)
    girdle, grs = _shoulder_girdle(S, a.view == "AP")  # clavicles and scapulae over the ribs
    sub = bone[grs]
    np.maximum(sub, girdle, out=sub)
    _, spine, sc = _frontal_static(S)
    bone[:, sc] += spine
    # bone contrast is lower over dense tissue: D += bone_k * bone * (0.45 + 0.55 air)
    w = air * (0.55 * _BONE)
    w += 0.45 * _BONE
    w *= bone
    D += w
    del bone, w

    # --- compose: soft tissue + bone - aerated lung (+ markings where aerated)
    # D += extra - lung_air * (air (1 - 0.55 marks (1 - rim)) + 0.2 rim)
    if ptx_rim is not None:
        marks *= 1.0 - ptx_rim
    marks *= -0.55
    marks += 1.0
    marks *= air
    if ptx_rim is not None:
        marks += 0.2 * ptx_rim
    marks *= _LUNG_AIR
    D += extra
    D -= marks
    # devices are metal, drawn last
    devices = [(i, f) for i, f in enumerate(spec.findings) if f.observation == "Support Devices"]
    if devices:
        metal = np.zeros((S, S), np.float32)
        for i, f in devices:
            _draw_device(f, cv, th, metal, fr[(i + 7) % 16])
        metal *= _METAL
        D += metal

    # --- acquisition: positioning, exposure, noise
    return _acquire(D, a, size, grain, a.rot_deg, a.zoom, a.shift_x, a.shift_y)
