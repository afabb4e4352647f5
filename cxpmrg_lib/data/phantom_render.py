"""Drawing of the synthetic chest radiographs (the phantom's pixels).

A study is described by a `StudySpec` (anatomy + findings); `render_study` turns it
into an 8-bit greyscale image. The picture is built as a density map (soft tissue,
bone, metal add; aerated lung subtracts) in resolution-free coordinates and mapped
to brightness like an exposure, so one spec renders alike at 128 or 1024 px.

Coordinates: x in [-1, 1] from the viewer's left to right, y in [0, 2] from top to
bottom (1 unit = half the image side). Radiological convention: the patient's right
is on the viewer's left, so side "right" is x < 0.

Everything is vectorised numpy on row/column slices; no per-pixel Python loops.
The only randomness inside `render_study` is drawn from its `rng` in a fixed
order at the start, so the same spec rendered with and without one finding
differs only where that finding is drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cxpmrg_lib.observations import CHEXPERT_LABELS

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


# ----------------------------------------------------------------------------- helpers
def _ramp(d, soft):
    """Soft inside indicator of a signed distance (positive inside)."""
    return np.clip(d / soft + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    a = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR))


class _Canvas:
    """Pixel grid plus drawing primitives in the x/y coordinates of the module docstring."""

    def __init__(self, size: int):
        self.S = size
        self.px = 2.0 / size  # one pixel in coordinate units
        self.x = ((np.arange(size, dtype=np.float32) + 0.5) * self.px - 1.0)
        self.y = ((np.arange(size, dtype=np.float32) + 0.5) * self.px)

    def rows(self, y0, y1):
        a = max(0, int((y0) / self.px) - 1)
        b = min(self.S, int(math.ceil(y1 / self.px)) + 1)
        return slice(a, max(a, b))

    def cols(self, x0, x1):
        a = max(0, int((x0 + 1.0) / self.px) - 1)
        b = min(self.S, int(math.ceil((x1 + 1.0) / self.px)) + 1)
        return slice(a, max(a, b))

    def blob(self, layer, cx, cy, rx, ry, value, soft=None, mult=None):
        """Add a soft ellipse (value at the centre, flat top) into `layer`."""
        soft = soft or 2 * self.px
        rs, cs = self.rows(cy - ry - soft, cy + ry + soft), self.cols(cx - rx - soft, cx + rx + soft)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        dx = (self.x[cs][None, :] - cx) / rx
        dy = (self.y[rs][:, None] - cy) / ry
        r = np.sqrt(dx * dx + dy * dy)
        w = _ramp((1.0 - r) * min(rx, ry), soft)
        if mult is not None:
            w = w * mult[rs, cs]
        layer[rs, cs] += value * w

    def gauss(self, layer, cx, cy, sx, sy, value):
        rs, cs = self.rows(cy - 3 * sy, cy + 3 * sy), self.cols(cx - 3 * sx, cx + 3 * sx)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        gx = np.exp(-0.5 * ((self.x[cs] - cx) / sx) ** 2)
        gy = np.exp(-0.5 * ((self.y[rs] - cy) / sy) ** 2)
        layer[rs, cs] += value * gy[:, None] * gx[None, :]

    def polyline(self, layer, pts, width, value):
        """Max-combine a stroke of half-width `width` along the points into `layer`."""
        pts = np.asarray(pts, dtype=np.float32)
        soft = max(self.px, width * 0.5)
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            m = width + 2 * soft
            rs = self.rows(min(y0, y1) - m, max(y0, y1) + m)
            cs = self.cols(min(x0, x1) - m, max(x0, x1) + m)
            if rs.start >= rs.stop or cs.start >= cs.stop:
                continue
            X = self.x[cs][None, :]
            Y = self.y[rs][:, None]
            dx, dy = x1 - x0, y1 - y0
            L2 = dx * dx + dy * dy + 1e-12
            t = np.clip(((X - x0) * dx + (Y - y0) * dy) / L2, 0.0, 1.0)
            d = np.sqrt((X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2)
            np.maximum(layer[rs, cs], value * _ramp(width - d, soft), out=layer[rs, cs])


def _bezier(p0, p1, p2, n=12):
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float32) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


# ----------------------------------------------------------------------------- geometry
class _Thorax:
    """Per-side lung geometry derived from an Anatomy and the findings that change it."""

    def __init__(self, a: Anatomy, findings):
        self.a = a
        self.dome = {"right": a.dome_r, "left": a.dome_r + a.dome_l_offset}
        self.lat = {"right": a.lung_lat, "left": a.lung_lat}
        ctr = a.ctr
        for f in findings:
            if f.observation == "Cardiomegaly":
                ctr = max(ctr, 0.5 + 0.06 * SEVERITY_SCALE[f.severity])
            if f.observation == "Atelectasis" and SEVERITY_SCALE[f.severity] >= 2:
                for s in _sides(f.side):  # volume loss pulls the hemidiaphragm up
                    self.dome[s] -= 0.05 * (SEVERITY_SCALE[f.severity] - 1)
        self.ctr = ctr
        self.cp = {s: d + a.cp_depth for s, d in self.dome.items()}
        self.mediastinum_extra = 0.0
        for f in findings:
            if f.observation == "Enlarged Cardiomediastinum":
                self.mediastinum_extra = 0.05 + 0.035 * SEVERITY_SCALE[f.severity]
        # heart: an ellipse whose width gives the CTR against the thoracic width
        thoracic = a.lung_lat * 2
        self.hrx = ctr * thoracic / 2
        self.hry = 0.40 + 0.15 * (self.hrx - 0.36)
        self.hx = 0.30 * self.hrx
        self.hy = a.dome_r + 0.07

    def t(self, side, y):
        return (y - self.a.apex_y) / (self.cp[side] - self.a.apex_y)

    def y_of_t(self, side, t):
        return self.a.apex_y + t * (self.cp[side] - self.a.apex_y)

    def centre_hw(self, side, t):
        """Lung centre |x| and half-width at lung-local height t."""
        tc = np.clip(t, 0.0, 1.0)
        xc = 0.39 + 0.06 * tc
        hw = (self.lat[side] - 0.45) * (tc * (2 - tc)) ** 0.55
        return xc, hw


def _sides(side):
    return ("right", "left") if side in ("bilateral", "") else (side,)


def _sgn(side):
    return -1.0 if side == "right" else 1.0


# ----------------------------------------------------------------------------- renderer
def _internal_size(size: int) -> int:
    """Anatomy is drawn at half the output size above 160 px (4x fewer pixel operations);
    the positioning transform upsamples it and the grain is added at full size."""
    return size if size <= 160 else (size + 1) // 2


def _acquire(D: np.ndarray, a: Anatomy, size: int, noise: np.ndarray, rot_deg: float, zoom: float,
             shift_x: float, shift_y: float) -> np.ndarray:
    """Positioning (rotation, zoom, shift, upsampling), exposure curve and grain -> uint8."""
    R = D.shape[0]
    k = R / size
    c, s_ = math.cos(math.radians(rot_deg)) / zoom, math.sin(math.radians(rot_deg)) / zoom
    cx = cy = size / 2
    tx, ty = shift_x * size / 2, shift_y * size / 2
    # output pixel -> input pixel (inverse affine around the centre, then the scale to the drawing grid)
    coeffs = tuple(k * v for v in (c, -s_, cx - c * (cx + tx) + s_ * (cy + ty),
                                   s_, c, cy - s_ * (cx + tx) - c * (cy + ty)))
    D = np.asarray(Image.fromarray(D, mode="F").transform((size, size), Image.AFFINE, coeffs,
                                                          resample=Image.BILINEAR), dtype=np.float32)
    g = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size)
    D = D * (1.0 - 0.10 * (g[:, None] - 1.0) ** 2 - 0.06 * (g[None, :] - 1.0) ** 2)  # vignetting
    # exposure: 1 - exp(-gain * D), normalised and gamma-shaped, through a lookup table
    lut_d = np.linspace(0.0, 1.6, 1025, dtype=np.float32)
    lut = np.clip((1.0 - np.exp(-a.gain * lut_d)) / (1.0 - math.exp(-a.gain * 1.1)), 0, 1) ** a.gamma
    idx = np.clip(D * (1024 / 1.6), 0, 1024).astype(np.int32)
    I = lut.astype(np.float32)[idx] + (3.0 * a.noise) * noise
    return (np.clip(I, 0, 1) * 255 + 0.5).astype(np.uint8)



_TISSUE, _LUNG_AIR, _BONE, _METAL = 0.56, 0.40, 0.12, 0.9


def render_study(spec: StudySpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal (PA/AP) radiograph of `spec` as a (size, size) uint8 array."""
    a = spec.anatomy
    S = _internal_size(size)
    cv = _Canvas(S)
    # all randomness first, in a fixed order (see the module docstring)
    noise = rng.random((size, size), dtype=np.float32) - 0.5  # uniform: as good as gaussian here, cheaper
    tex = _smooth_noise(rng, S, 24)
    patch = _smooth_noise(rng, S, 10)
    vessel = _smooth_noise(rng, S, 28)
    finding_seeds = rng.integers(0, 2**31, 16)

    th = _Thorax(a, spec.findings)
    x, y = cv.x, cv.y
    D = np.zeros((S, S), np.float32)      # density: tissue + bone + metal
    air = np.zeros((S, S), np.float32)    # aerated lung fraction
    marks = np.zeros((S, S), np.float32)  # vascular markings (drawn only where lung is aerated)

    # --- body: soft tissue thickness with neck and shoulders
    bw = np.where(y < 0.06, 0.26, np.minimum(a.body_w, 0.26 + (a.body_w - 0.26) * np.clip((y - 0.06) / 0.26, 0, 1) ** 0.5))
    bw = bw.astype(np.float32)
    rel = np.abs(x)[None, :] / bw[:, None]
    body = (0.12 + 0.88 * np.sqrt(np.clip(1.0 - rel ** 2, 0.0, 1.0))) * _ramp(bw[:, None] - np.abs(x)[None, :], 3 * cv.px)
    D += _TISSUE * body.astype(np.float32)
    # arms / humeral heads at the upper corners
    for s in (-1, 1):
        cv.blob(D, s * (a.body_w - 0.02), 0.26, 0.09, 0.12, 0.12, soft=0.05)
    if a.sex == "Female":  # breast shadows over the lower lungs
        for s in (-1, 1):
            cv.blob(D, s * 0.55, th.dome[("right", "left")[s > 0]] - 0.02, 0.34, 0.24, 0.10, soft=0.12)

    # --- lungs (per side, on that half of the columns)
    mid = S // 2
    heart_d = None
    for side, cs in (("right", slice(0, mid)), ("left", slice(mid, S))):
        ax = np.abs(x[cs])
        t = th.t(side, y)
        xc, hw = th.centre_hw(side, t)
        inside = _ramp(hw[:, None] - np.abs(ax[None, :] - xc[:, None]), 1.5 * cv.px)
        inside *= (t > 0)[:, None]
        # hemidiaphragm dome: peak at |x| = 0.42, falling to the costophrenic angle laterally
        P, C, L = th.dome[side], th.cp[side], th.lat[side]
        lat = np.clip((ax - 0.42) / (L - 0.42), 0, None)
        med = np.clip((0.42 - ax) / 0.34, 0, None)
        ydome = P + (C - P) * lat ** 2 + 0.10 * med ** 2
        inside *= _ramp(ydome[None, :] - y[:, None], 1.5 * cv.px)
        # mediastinum (+ aortic knob on the patient's left)
        mw = np.full_like(y, a.med_w + th.mediastinum_extra)
        mw = np.where(y < 0.25, mw * 0.8, mw)
        if side == "left":
            knob = 0.075 + 0.3 * th.mediastinum_extra
            dyk = (y - 0.64) / (knob * 1.1)
            mw = np.maximum(mw, (0.15 + th.mediastinum_extra * 0.8 + knob * np.sqrt(np.clip(1 - dyk ** 2, 0, 1))) * (np.abs(dyk) < 1))
        inside *= _ramp(ax[None, :] - mw[:, None], 1.5 * cv.px)
        air[:, cs] = inside
    # heart cuts into the lungs and adds a little density
    rs = cv.rows(th.hy - th.hry - 0.05, th.hy + th.hry + 0.05)
    hx_ = (x[None, :] - th.hx) / th.hrx
    hy_ = (y[rs][:, None] - th.hy) / th.hry
    # flatter right border, rounder left apex: skew the ellipse slightly
    r = np.sqrt(hx_ ** 2 + (hy_ + 0.35 * hx_ * (hx_ > 0)) ** 2)
    heart = _ramp((1.0 - r) * th.hrx, 1.5 * cv.px)
    air[rs] *= 1.0 - heart
    # gastric air bubble under the left hemidiaphragm
    cv.blob(D, 0.45, th.dome["left"] + 0.12, 0.13, 0.06, -0.12, soft=0.03)
    heart_d = (rs, heart)

    # --- lung markings radiating from the hila, hilar shadows
    for side in ("right", "left"):
        sg = _sgn(side)
        cs = slice(0, mid) if side == "right" else slice(mid, S)
        hxp, hyp = sg * 0.22, 0.86
        X = x[cs][None, :] - hxp
        Y = y[:, None] - hyp
        rr = np.sqrt(X * X + Y * Y)
        ang = np.arctan2(Y, X * sg)
        radial = (0.5 + 0.5 * np.cos(22 * ang + 3.0 * tex[:, cs])) ** 10
        ridge = 0.5 * np.exp(-(vessel[:, cs] / 0.1) ** 2) + 0.5 * radial * np.clip(rr / 0.2, 0, 1)
        marks[:, cs] = ridge * (0.15 + 0.9 * np.exp(-rr / 0.3))
        cv.gauss(D, sg * 0.23, 0.88, 0.05, 0.09, 0.16)
        cv.gauss(D, sg * 0.2, 0.80, 0.03, 0.05, 0.08)

    # --- trachea and main bronchi (air column)
    tr = np.zeros((S, S), np.float32)
    carina = 0.64
    cv.polyline(tr, [(0.0, 0.0), (0.01, carina)], 0.035, 1.0)
    cv.polyline(tr, [(0.01, carina), (-0.14, carina + 0.14)], 0.022, 1.0)
    cv.polyline(tr, [(0.01, carina), (0.17, carina + 0.17)], 0.022, 1.0)
    D -= 0.16 * tr

    # --- findings that change lung aeration (before bones so bones overlay them)
    fr = [np.random.default_rng(int(s)) for s in finding_seeds]
    extra = np.zeros((S, S), np.float32)
    ptx_rim = np.zeros((S, S), np.float32)
    for i, f in enumerate(spec.findings):
        _draw_lung_finding(f, cv, th, air, extra, ptx_rim, patch, tex, fr[i % 16])

    # --- bones
    bone = np.zeros((S, S), np.float32)
    _draw_ribs(cv, th, bone, spec.findings)
    for s in (-1, 1):  # clavicles
        pts = _bezier((s * 0.07, 0.36 + (0.02 if a.view == "AP" else 0.05)), (s * 0.35, 0.30), (s * 0.68, 0.22), 6)
        cv.polyline(bone, pts, 0.03, 1.3)
        # scapular edge (more over the lungs on AP films)
        sx = 0.70 if a.view == "AP" else 0.80
        cv.polyline(bone, _bezier((s * 0.86, 0.30), (s * sx, 0.6), (s * (sx + 0.06), 0.95), 5), 0.012, 0.5)
    # spine: vertebral bodies with endplates and pedicles
    sc = cv.cols(-0.09, 0.09)
    xs = x[sc]
    col = _ramp(0.065 - np.abs(xs), 2 * cv.px)
    phase = (y - 0.05) / 0.115
    ends = (np.abs(phase - np.round(phase)) < 0.12).astype(np.float32)
    ped = np.exp(-((np.abs(xs) - 0.045) / 0.015) ** 2)[None, :] * (0.5 + 0.5 * np.cos(2 * np.pi * phase))[:, None]
    bone[:, sc] += (col[None, :] * (0.9 + 0.4 * ends[:, None]) + 0.6 * ped) * np.clip((y[:, None] - 0.1) / 0.2, 0.3, 1)
    D += _BONE * bone * (0.45 + 0.55 * air)  # bone contrast is lower over dense tissue
    del bone

    # --- compose: soft tissue + bone - aerated lung (+ markings where aerated)
    air_eff = air * (1.0 - 0.55 * marks * (1.0 - ptx_rim)) + 0.2 * ptx_rim
    D += extra - _LUNG_AIR * air_eff
    # devices are metal, drawn last
    metal = np.zeros((S, S), np.float32)
    for i, f in enumerate(spec.findings):
        if f.observation == "Support Devices":
            _draw_device(f, cv, th, metal, fr[(i + 7) % 16])
    D += _METAL * metal

    # --- acquisition: positioning, exposure, noise
    return _acquire(D, a, size, noise, a.rot_deg, a.zoom, a.shift_x, a.shift_y)


# ----------------------------------------------------------------------------- findings
def _zone_rows(th, side, zone):
    t = ZONE_T.get(zone, 0.6)
    return th.y_of_t(side, t), t


def _draw_lung_finding(f, cv, th, air, extra, ptx_rim, patch, tex, rng):
    o, m = f.observation, SEVERITY_SCALE.get(f.severity, 2.0)
    if f.uncertain:
        m = max(1.0, m - 0.5)
    S, x, y = cv.S, cv.x, cv.y
    if o == "Pleural Effusion":
        h = {1.0: 0.07, 1.5: 0.12, 2.0: 0.22, 3.0: 0.46}.get(m, 0.22)
        for side in _sides(f.side):
            cs = slice(0, S // 2) if side == "right" else slice(S // 2, S)
            ax = np.abs(x[cs])
            C, L = th.cp[side], th.lat[side]
            level = C - h - 0.5 * h * np.clip((ax - 0.25) / (L - 0.25), 0, 1) ** 2
            fluid = np.clip((y[:, None] - level[None, :]) / 0.05, 0, 1)
            air[:, cs] *= 1.0 - 0.95 * fluid
    elif o == "Pneumothorax":
        w = {1.0: 0.05, 1.5: 0.07, 2.0: 0.10, 3.0: 0.2}.get(m, 0.1)
        for side in _sides(f.side):
            cs = slice(0, S // 2) if side == "right" else slice(S // 2, S)
            ax = np.abs(x[cs])
            t = th.t(side, y)
            xc, hw = th.centre_hw(side, t)
            taper = np.clip(1.25 - t, 0.1, 1.0)  # apicolateral in the upright patient
            dlat = (xc + hw)[:, None] - ax[None, :]
            edge = (w * taper)[:, None]
            lung = air[:, cs] > 0.3
            rim = ((dlat < edge) & lung).astype(np.float32)
            # visceral pleural line: a thin bright line at the rim's inner edge
            line = np.exp(-((dlat - edge) / (1.2 * cv.px)) ** 2) * lung
            np.maximum(ptx_rim[:, cs], rim, out=ptx_rim[:, cs])
            extra[:, cs] += 0.14 * line
            # the collapsed lung is a little denser next to the rim
            extra[:, cs] += 0.05 * ((dlat >= edge) & (dlat < edge + 0.08) & lung)
    elif o == "Cardiomegaly" or o == "Enlarged Cardiomediastinum":
        pass  # geometry handled by _Thorax
    elif o == "Edema":
        for side in ("right", "left"):
            sg = _sgn(side)
            cs = slice(0, S // 2) if side == "right" else slice(S // 2, S)
            gx = np.exp(-0.5 * ((x[cs] - sg * 0.3) / 0.22) ** 2)
            gy = np.exp(-0.5 * ((y - 0.95) / 0.32) ** 2)
            haze = gy[:, None] * gx[None, :] * (0.8 + 0.4 * tex[:, cs])
            air[:, cs] *= 1.0 - (0.22 + 0.14 * m) * np.clip(haze, 0, 1)
            # Kerley B lines: short horizontal lines at the lateral lung bases
            for k in range(int(3 + 2 * m)):
                yy = th.y_of_t(side, 0.72 + 0.045 * k + rng.uniform(-0.01, 0.01))
                t = th.t(side, yy)
                xc, hw = th.centre_hw(side, np.array([t]))
                edgex = float(xc[0] + hw[0]) - 0.01
                lines = np.zeros((S, S), np.float32)
                cv.polyline(lines, [(sg * (edgex - 0.07), yy), (sg * edgex, yy)], 0.006, 1.0)
                extra += 0.10 * lines * (air > 0.3)
    elif o in ("Lung Opacity", "Consolidation", "Pneumonia"):
        for side in _sides(f.side):
            sg = _sgn(side)
            zone = f.zone or "lower"
            cy, t = _zone_rows(th, side, zone)
            xc, hw = th.centre_hw(side, np.array([t]))
            cx = sg * float(xc[0] + rng.uniform(-0.3, 0.3) * hw[0])
            if o == "Consolidation":
                rx, ry, dens = float(hw[0]) * 0.9, 0.22 + 0.04 * m, 0.78 + 0.05 * m
            elif o == "Pneumonia":
                rx, ry, dens = 0.16 + 0.03 * m, 0.15 + 0.03 * m, 0.68
            else:
                rx, ry, dens = 0.17 + 0.04 * m, 0.16 + 0.04 * m, 0.42 + 0.1 * m
            region = np.zeros((S, S), np.float32)
            cv.gauss(region, cx, cy, rx * 0.7, ry * 0.7, 1.0)
            if o == "Consolidation":
                region = np.clip(region * 2.2 - 0.4 + 0.3 * patch, 0, 1)
            else:
                region = np.clip(region * (1.2 + 0.9 * patch) - 0.1, 0, 1)
            air *= 1.0 - dens * region
            if o in ("Consolidation", "Pneumonia"):  # air bronchograms: dark branches
                hxp = sg * 0.22
                X, Y = x[None, :] - hxp, y[:, None] - 0.86
                ang = np.arctan2(Y, X * sg)
                br = (0.5 + 0.5 * np.cos(18 * ang + 0.5 * tex)) ** 16 * (region > 0.6)
                extra -= 0.10 * br
    elif o == "Atelectasis":
        for side in _sides(f.side):
            sg = _sgn(side)
            zone = f.zone or "base"
            cy, t = _zone_rows(th, side, zone if zone != "apex" else "upper")
            xc, hw = th.centre_hw(side, np.array([min(t, 0.95)]))
            cx = sg * float(xc[0])
            band = np.zeros((S, S), np.float32)
            tilt = rng.uniform(-0.05, 0.05)
            L = float(hw[0]) * 0.8
            cv.polyline(band, [(cx - L, cy - 0.03 + tilt), (cx + L, cy - 0.03 - tilt)], 0.012 + 0.006 * m, 1.0)
            if m >= 2:
                cv.polyline(band, [(cx - 0.7 * L, cy + 0.06), (cx + 0.7 * L, cy + 0.07)], 0.01 + 0.004 * m, 1.0)
                cv.gauss(band, cx, cy + 0.06, L * 0.6, 0.05, 0.5 * (m - 1))
            air *= 1.0 - 0.85 * np.clip(band, 0, 1)
    elif o == "Lung Lesion":
        for side in _sides(f.side) if f.side != "bilateral" else ("right", "left"):
            sg = _sgn(side)
            cy, t = _zone_rows(th, side, f.zone or "upper")
            xc, hw = th.centre_hw(side, np.array([t]))
            cx = sg * float(xc[0] + rng.uniform(-0.4, 0.4) * hw[0])
            r = (0.07 + 0.03 * m) if f.kind == "mass" else (0.03 + 0.008 * m)
            blob = np.zeros((S, S), np.float32)
            cv.blob(blob, cx, cy, r, r * rng.uniform(0.85, 1.1), 1.0, soft=max(2 * cv.px, 0.15 * r))
            if f.kind == "mass":  # lobulated
                cv.blob(blob, cx + 0.5 * r, cy + 0.3 * r, 0.6 * r, 0.6 * r, 1.0)
            air *= 1.0 - 0.9 * np.clip(blob, 0, 1)
            extra += 0.08 * np.clip(blob, 0, 1)
    elif o == "Pleural Other":
        for side in _sides(f.side):
            sg = _sgn(side)
            cs = slice(0, S // 2) if side == "right" else slice(S // 2, S)
            ax = np.abs(x[cs])
            t = th.t(side, y)
            xc, hw = th.centre_hw(side, t)
            dlat = (xc + hw)[:, None] - ax[None, :]
            thick = 0.03 + 0.012 * m
            if f.zone == "apex":
                zsel = np.clip((0.35 - t) / 0.1, 0, 1)
            else:
                zsel = np.clip(1 - np.abs(t - 0.6) / 0.35, 0, 1)
            wav = thick * (0.7 + 0.5 * tex[:, cs])
            plaque = _ramp(wav - dlat, 1.5 * cv.px) * zsel[:, None]
            air[:, cs] *= 1.0 - 0.9 * plaque
            extra[:, cs] += 0.12 * plaque * (dlat < wav * 0.6)
    # Fracture and Support Devices are drawn with the bones / metal


def _rib_field(cv, ax, y0, step, n, g, dg, half, lo, hi):
    """All ribs of one family at once: rib k runs along y = y0 + k*step + g(|x|)*(1 + 0.08k)."""
    kk = np.clip((cv.y - y0) / step, 0, n - 1)
    phase = (cv.y[:, None] - y0 - g[None, :] * (1 + 0.08 * kk)[:, None]) / step
    k = np.floor(phase + 0.5)
    d = np.abs(phase - k) * (step / np.sqrt(1 + dg * dg))[None, :]
    inside = _ramp(half - d, 1.5 * cv.px) * ((k >= 0) & (k < n) & (lo < ax) & (ax < hi))
    return inside * (0.6 + 0.5 * (d / half) ** 2), k, phase


def _draw_ribs(cv, th, bone, findings):
    a = th.a
    S = cv.S
    step = a.rib_step
    for side in ("right", "left"):
        cs = slice(0, S // 2) if side == "right" else slice(S // 2, S)
        ax = np.abs(cv.x[cs])
        # posterior ribs: short rise from the spine, then a lateral downward sweep
        s_ = np.clip((ax - 0.05) / 0.82, 0, 1.2)
        g = -0.16 * s_ + 0.55 * s_ ** 2
        dg = (-0.16 + 1.1 * s_) / 0.82
        val, k, phase = _rib_field(cv, ax, a.rib_y0, step, 10, g, dg, 0.03, 0.0, a.lung_lat + 0.07)
        for j, f in enumerate(f for f in findings if f.observation == "Fracture"):
            if side not in _sides(f.side):
                continue
            kf = {"apex": 2, "upper": 3, "middle": 5, "lower": 7, "base": 8}.get(f.zone, 5 + j % 3)
            uf = 0.55 + 0.08 * (j % 3)
            lateral = (ax > uf)[None, :]
            # remove the rib beyond the break and redraw it displaced, with a gap at the break
            val = val * ~((k == kf) & lateral)
            disp = 0.024 * (1 + 0.08 * kf)
            v2, k2, _ = _rib_field(cv, ax, a.rib_y0 + disp, step, 10, g, dg, 0.03, uf + 0.02, a.lung_lat + 0.07)
            val = np.maximum(val * ~((k == kf) & (np.abs(ax - uf) < 0.02)[None, :]), v2 * (k2 == kf))
        bone[:, cs] += val
        # anterior ribs: faint, running down towards the midline
        sa = np.clip((ax - 0.25) / 0.6, 0, 1)
        ga = 0.18 * (1 - sa) - 0.1 * (1 - sa) ** 2 - 0.05 * sa
        dga = (-0.18 + 0.2 * (1 - sa) - 0.05) / 0.6
        va, _, _ = _rib_field(cv, ax, a.rib_y0 + 0.05 + 1.2 * step, 1.2 * step, 6, ga, dga, 0.022, 0.28,
                              a.lung_lat)
        bone[:, cs] += 0.35 * va


def _draw_device(f, cv, th, metal, rng):
    kind = f.kind or "central_line"
    sg = -1.0 if f.side == "right" else 1.0
    carina = 0.64
    if kind == "ett":
        tip = carina - rng.uniform(0.06, 0.14)
        cv.polyline(metal, [(0.0, 0.0), (0.005, tip)], 0.022, 0.18)
        cv.polyline(metal, [(-0.01, 0.0), (-0.005, tip)], 0.005, 0.7)
    elif kind == "ng_tube":
        stom_y = th.dome["left"] + 0.16
        pts = np.concatenate([_bezier((0.02, 0.0), (0.0, 0.9), (0.06, th.dome["left"]), 10),
                              _bezier((0.06, th.dome["left"]), (0.12, stom_y + 0.05), (0.38, stom_y), 8)[1:]])
        cv.polyline(metal, pts, 0.008, 0.65)
    elif kind in ("central_line", "picc"):
        tip = (sg * -0.0 - 0.06, 0.86 + rng.uniform(-0.04, 0.04))
        if kind == "picc":
            pts = np.concatenate([_bezier((sg * 0.98, 0.52), (sg * 0.55, 0.36), (sg * 0.25, 0.48), 10),
                                  _bezier((sg * 0.25, 0.48), (-0.05, 0.55), tip, 8)[1:]])
        else:
            pts = _bezier((sg * 0.16, 0.0), (sg * 0.12, 0.45), tip, 12)
        cv.polyline(metal, pts, 0.007, 0.7)
    elif kind == "pacemaker":
        gx, gy = sg * 0.58, 0.40
        cv.blob(metal, gx, gy, 0.11, 0.08, 1.1, soft=2 * cv.px)
        ra = (-0.12, th.hy - 0.12)
        rv = (th.hx + 0.1, th.hy + 0.12)
        cv.polyline(metal, np.concatenate([_bezier((gx, gy), (sg * 0.2, 0.2), (-0.03, 0.6), 8),
                                           _bezier((-0.03, 0.6), (-0.15, 0.85), ra, 8)[1:]]), 0.007, 0.8)
        cv.polyline(metal, np.concatenate([_bezier((gx, gy), (sg * 0.25, 0.25), (0.0, 0.62), 8),
                                           _bezier((0.0, 0.62), (-0.1, th.hy + 0.05), rv, 8)[1:]]), 0.007, 0.8)
    elif kind == "sternal_wires":
        for k in range(6):
            yy = 0.62 + k * 0.1
            cv.blob(metal, 0.0, yy, 0.035, 0.018, 1.0, soft=cv.px)
            cv.blob(metal, 0.0, yy, 0.02, 0.008, -0.9, soft=cv.px)
    elif kind == "chest_tube":
        base = (sg * 0.9, th.cp["left" if sg > 0 else "right"] - 0.05)
        pts = _bezier(base, (sg * 0.7, 0.7), (sg * 0.42, 0.35), 12)
        cv.polyline(metal, pts, 0.014, 0.35)
        cv.polyline(metal, pts, 0.004, 0.6)


# ----------------------------------------------------------------------------- lateral view
def render_lateral(spec: StudySpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """A simple left lateral view of `spec` (anterior to the viewer's left) as uint8.

    Coarser than the frontal: body, lungs, heart, spine, sternum, trachea, domes and
    posterior sulci; effusion, cardiomegaly, lung densities, edema and the larger
    devices are shown; pneumothorax, fracture and pleural thickening are not.
    """
    a = spec.anatomy
    S = _internal_size(size)
    cv = _Canvas(S)
    noise = rng.random((size, size), dtype=np.float32) - 0.5
    tex = _smooth_noise(rng, S, 24)
    vessel = _smooth_noise(rng, S, 28)
    seeds = rng.integers(0, 2**31, 16)
    th = _Thorax(a, spec.findings)
    x, y = cv.x, cv.y
    D = np.zeros((S, S), np.float32)
    # body: antero-posterior thickness, thinner at the neck
    front = np.where(y < 0.3, -0.35 - 0.4 * np.clip(y / 0.3, 0, 1), -0.75 - 0.05 * np.clip((y - 0.3) / 1.0, 0, 1))
    back = np.where(y < 0.3, 0.55 + 0.3 * np.clip(y / 0.3, 0, 1), 0.88)
    body = _ramp(np.minimum(x[None, :] - front[:, None], back[:, None] - x[None, :]), 3 * cv.px)
    D += _TISSUE * 0.95 * body
    cv.blob(D, -0.25, 0.45, 0.45, 0.3, 0.12, soft=0.15)  # arms
    # lung: one field between sternum and spine, above the domes
    dome = th.dome["right"] - 0.12
    cp_post = th.cp["right"] + 0.08
    top = a.apex_y + 0.05
    t = np.clip((y - top) / (cp_post - top), 0, 1)
    ant = -0.62 + 0.25 * (1 - t) ** 3
    post = 0.58 - 0.25 * (1 - t) ** 3
    xr = (x + 0.62) / 1.2
    ydome = dome - 0.04 + 0.10 * (1 - np.clip(xr, 0, 1)) ** 2 * 0 + (cp_post - dome) * np.clip((xr - 0.45) / 0.55, 0, 1) ** 2
    ydome = ydome + 0.10 * np.clip((0.25 - xr) / 0.25, 0, 1)
    air = _ramp(np.minimum(x[None, :] - ant[:, None], post[:, None] - x[None, :]), 1.5 * cv.px)
    air *= _ramp(ydome[None, :] - y[:, None], 1.5 * cv.px) * (y > top)[:, None]
    # heart: anterior and inferior, resting on the domes
    hr = th.hrx * 1.05
    heart = np.zeros((S, S), np.float32)
    cv.blob(heart, -0.66 + hr * 0.85, dome + 0.02 - 0.15, hr * 0.85, 0.3, 1.0, soft=0.02)
    air *= 1 - np.clip(heart, 0, 1)
    # hilum / vessels
    marks = np.exp(-(vessel / 0.1) ** 2) * 0.8
    cv.gauss(D, 0.05, 0.85, 0.12, 0.12, 0.12)
    fr = [np.random.default_rng(int(s)) for s in seeds]
    extra = np.zeros((S, S), np.float32)
    for i, f in enumerate(spec.findings):
        o, m = f.observation, SEVERITY_SCALE.get(f.severity, 2.0)
        if o == "Pleural Effusion":  # fluid fills the posterior sulcus first, meniscus up the back
            h = {1.0: 0.08, 1.5: 0.12, 2.0: 0.2, 3.0: 0.4}.get(m, 0.2) * (1.2 if f.side == "bilateral" else 1.0)
            level = cp_post - h - 0.25 * h * np.clip(xr, 0, 1)
            air *= 1 - 0.95 * np.clip((y[:, None] - level[None, :] - 0.5 * h * (1 - np.clip(xr, 0, 1))[None, :]) / 0.05, 0, 1)
        elif o in ("Lung Opacity", "Consolidation", "Pneumonia", "Lung Lesion", "Atelectasis"):
            zt = ZONE_T.get(f.zone or "lower", 0.6)
            cy = top + zt * (dome - top)
            cx = 0.1 + 0.25 * zt + fr[i].uniform(-0.15, 0.15)
            reg = np.zeros((S, S), np.float32)
            if o == "Lung Lesion":
                r = 0.09 if f.kind == "mass" else 0.04
                cv.blob(reg, cx, cy, r, r, 1.0)
            elif o == "Atelectasis":
                cv.polyline(reg, [(cx - 0.3, cy), (cx + 0.25, cy + 0.05)], 0.015, 1.0)
            else:
                cv.gauss(reg, cx, cy, 0.2, 0.15, 1.0)
                reg = np.clip(reg * (1.3 + 0.8 * tex) - 0.2, 0, 1)
            air *= 1 - (0.8 if o != "Lung Opacity" else 0.5) * np.clip(reg, 0, 1)
        elif o == "Edema":
            cv.gauss(extra, 0.0, 0.9, 0.3, 0.3, 0.05 + 0.04 * m)
        elif o == "Support Devices":
            if f.kind == "pacemaker":
                cv.blob(extra, -0.62, 0.42, 0.05, 0.1, 0.9)
                cv.polyline(extra, _bezier((-0.62, 0.42), (-0.2, 0.5), (-0.3, dome - 0.1), 10), 0.007, 0.7)
            elif f.kind == "sternal_wires":
                for k in range(5):
                    cv.blob(extra, -0.74, 0.6 + 0.11 * k, 0.012, 0.03, 0.9, soft=cv.px)
            elif f.kind == "ett":
                cv.polyline(extra, [(-0.2, 0.0), (-0.05, 0.6)], 0.005, 0.7)
    # spine: vertebral bodies behind the lungs, with disc spaces
    sc = cv.cols(0.55, 0.9)
    phase = (y - 0.05) / 0.12
    disc = np.abs(phase - np.round(phase)) < 0.1
    col = _ramp(np.minimum(x[sc] - 0.6, 0.78 - x[sc]), 2 * cv.px)
    bone = np.zeros((S, S), np.float32)
    bone[:, sc] += col[None, :] * (1.0 - 0.5 * disc[:, None]) * (y > 0.1)[:, None]
    cv.polyline(bone, _bezier((-0.7, 0.35), (-0.78, 0.8), (-0.74, 1.25), 6), 0.025, 0.8)  # sternum
    for k in range(9):  # rib arcs, faint and overlapping
        yk = a.rib_y0 + 0.1 + k * a.rib_step
        cv.polyline(bone, _bezier((0.75, yk), (0.1, yk + 0.05), (-0.6, yk + 0.35), 6), 0.018, 0.25)
    tr = np.zeros((S, S), np.float32)
    cv.polyline(tr, [(-0.25, 0.0), (-0.05, 0.75)], 0.04, 1.0)
    D += _BONE * bone - 0.14 * tr + extra - _LUNG_AIR * 0.95 * air * (1 - 0.5 * marks)
    return _acquire(D, a, size, noise, a.rot_deg * 0.5, 1.0, 0.0, 0.0)
