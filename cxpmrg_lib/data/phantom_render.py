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
from functools import lru_cache

import numpy as np
from PIL import Image

try:  # the ufunc behind np.clip, without np.clip's Python-level argument handling (~5 us a call)
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - other numpy layouts
    _clip = np.clip

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
# Speed notes. At 256 px one study must cost a few milliseconds, so: the anatomy is drawn
# at half the output size and upsampled once; everything that depends on the pixel grid
# only (hilar angle fields, spine, trachea, vignetting) is computed once per size and
# cached; the smooth random fields are windows at a random offset into cached tiles
# (same statistics as fresh fields, no per-study resampling); strokes are evaluated for
# several segments at once on their bounding box; the grain is 1 random byte per pixel.
def _ramp(d, soft):
    """Soft inside indicator of a signed distance (positive inside)."""
    r = d * (1.0 / soft)
    r += 0.5
    return _clip(r, 0.0, 1.0, out=r)


def _ramp_(d, soft):
    """`_ramp` computed in place in `d` (a temporary)."""
    d *= 1.0 / soft
    d += 0.5
    return _clip(d, 0.0, 1.0, out=d)


def _tile_side(S: int) -> int:
    """Side of the cached random tiles: 4 windows wide (2 above 256 px of drawing, for memory)."""
    return 4 * S if 4 * S <= 1024 else 2 * S


@lru_cache(maxsize=32)
def _noise_tile(S: int, cells: int, salt: int) -> np.ndarray:
    """A smooth gaussian field, `cells` cells per S pixels, `_tile_side(S)` pixels square (read-only).

    A study takes an (S, S) window at a random offset and orientation: a field with the
    statistics of a fresh `cells` x `cells` grid resized bilinearly to S (what each study
    used to draw), for the price of a slice."""
    T = _tile_side(S)
    n = cells * T // S
    g = np.random.default_rng([7919, salt, S, cells]).standard_normal((n, n)).astype(np.float32)
    t = np.asarray(Image.fromarray(g, mode="F").resize((T, T), Image.BILINEAR), dtype=np.float32)
    return _frozen(t)[0]


@lru_cache(maxsize=32)
def _tile_fn(S: int, cells: int, salt: int, fn: str) -> np.ndarray:
    """A pointwise function of `_noise_tile(S, cells, salt)`, cached (read-only)."""
    t = _noise_tile(S, cells, salt)
    out = {"cos3": lambda: np.cos(3.0 * t), "sin3": lambda: np.sin(3.0 * t),
           "cos05": lambda: np.cos(0.5 * t), "sin05": lambda: np.sin(0.5 * t),
           "ridge": lambda: np.exp(-(t / 0.1) ** 2)}[fn]().astype(np.float32)
    return _frozen(out)[0]


class _Fields:
    """One study's smooth random fields: windows of the cached tiles at offsets and
    orientations (flips, transpose) drawn from the study's rng."""

    TEX, PATCH, VESSEL = (24, 1), (10, 2), (28, 3)  # (cells per image side, tile salt)

    def __init__(self, S: int, rng: np.random.Generator):
        self.S = S
        span = _tile_side(S) - S + 1
        off = rng.integers(0, span, 6).tolist()
        orient = rng.integers(0, 8, 3).tolist()
        self.view = {k: (off[2 * i], off[2 * i + 1], orient[i])
                     for i, k in enumerate((self.TEX, self.PATCH, self.VESSEL))}

    def get(self, which, fn: str | None = None, rs=slice(None), cs=slice(None)):
        """The (S, S) field `which` (or `fn` of it), restricted to rows `rs` and columns `cs`."""
        oy, ox, o = self.view[which]
        S = self.S
        tile = _noise_tile(S, *which) if fn is None else _tile_fn(S, *which, fn)
        win = tile[oy:oy + S, ox:ox + S]
        if o & 1:
            win = win[::-1]
        if o & 2:
            win = win[:, ::-1]
        if o & 4:
            win = win.T
        return win[rs, cs]


class _Canvas:
    """Pixel grid plus drawing primitives in the x/y coordinates of the module docstring."""

    def __init__(self, size: int):
        self.S = size
        self.px = 2.0 / size  # one pixel in coordinate units
        self.x = ((np.arange(size, dtype=np.float32) + 0.5) * self.px - 1.0)
        self.y = ((np.arange(size, dtype=np.float32) + 0.5) * self.px)
        self.ax = np.abs(self.x)
        self.mid = size // 2
        self._ar = np.arange(2 * size, dtype=np.float32) * np.float32(self.px)

    def side_cols(self, side):
        return slice(0, self.mid) if side == "right" else slice(self.mid, self.S)

    def rows(self, y0, y1):
        a = max(0, int(float(y0) / self.px) - 1)
        b = min(self.S, int(math.ceil(float(y1) / self.px)) + 1)
        return slice(a, max(a, b))

    def cols(self, x0, x1):
        a = max(0, int((float(x0) + 1.0) / self.px) - 1)
        b = min(self.S, int(math.ceil((float(x1) + 1.0) / self.px)) + 1)
        return slice(a, max(a, b))

    def blob(self, layer, cx, cy, rx, ry, value, soft=None, mult=None):
        """Add a soft ellipse (value at the centre, flat top) into `layer`."""
        soft = soft or 2 * self.px
        rs, cs = self.rows(cy - ry - soft, cy + ry + soft), self.cols(cx - rx - soft, cx + rx + soft)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        dx = (self.x[cs] - cx) / rx
        dy = (self.y[rs] - cy) / ry
        r = np.add.outer(dy * dy, dx * dx)
        np.sqrt(r, out=r)
        k = min(rx, ry) / soft  # ramp((1 - r) * min(rx, ry), soft) = clip(k (1 - r) + 0.5)
        r *= -k
        r += k + 0.5
        _clip(r, 0.0, 1.0, out=r)
        r *= value
        if mult is not None:
            r *= mult[rs, cs]
        layer[rs, cs] += r

    def gauss(self, layer, cx, cy, sx, sy, value):
        rs, cs = self.rows(cy - 3 * sy, cy + 3 * sy), self.cols(cx - 3 * sx, cx + 3 * sx)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        gx = np.exp(-0.5 * ((self.x[cs] - cx) / sx) ** 2)
        gy = np.exp(-0.5 * ((self.y[rs] - cy) / sy) ** 2) * value
        layer[rs, cs] += np.multiply.outer(gy, gx)

    def polyline(self, layer, pts, width, value):
        """Max-combine a stroke of half-width `width` along the points into `layer`."""
        pts = np.asarray(pts, dtype=np.float32).reshape(-1, 2)
        self.segments(layer, np.concatenate([pts[:-1], pts[1:]], axis=1), width, value)

    def segments(self, layer, seg, width, value):
        """Max-combine strokes along the segments (rows x0, y0, x1, y1) into `layer`.

        `width` (the half-width) and `value` are one number or one per segment. Every segment is measured
        in its own pixel window (the windows padded to one size and computed together),
        then max-combined into `layer` window by window: a fixed, small number of numpy
        calls per batch of segments, on few pixels."""
        seg = np.asarray(seg, dtype=np.float32).reshape(-1, 4)
        g = len(seg)
        if g == 0:
            return
        px, S = self.px, self.S
        widths = [float(v) for v in width] if np.ndim(width) else [float(width)] * g
        softs = [max(px, v * 0.5) for v in widths]
        r0s, r1s, c0s, c1s, bx, by = [], [], [], [], [], []
        for (x0, y0, x1, y1), wd, sf in zip(seg.tolist(), widths, softs):
            mm = wd + 2 * sf
            c0 = math.floor((min(x0, x1) - mm + 1.0) / px) - 1
            r0 = math.floor((min(y0, y1) - mm) / px) - 1
            c0s.append(c0)
            r0s.append(r0)
            c1s.append(math.ceil((max(x0, x1) + mm + 1.0) / px) + 1)
            r1s.append(math.ceil((max(y0, y1) + mm) / px) + 1)
            bx.append((c0 + 0.5) * px - 1.0 - x0)  # window pixel centres relative to the start
            by.append((r0 + 0.5) * px - y0)
        h = max(b - a for a, b in zip(r0s, r1s))
        w = max(b - a for a, b in zip(c0s, c1s))
        ar = self.arange_px(max(h, w))
        ex = np.add.outer(np.array(bx, np.float32), ar[:w])   # (g, w): x - x0
        ey = np.add.outer(np.array(by, np.float32), ar[:h])   # (g, h): y - y0
        d = seg[:, 2:] - seg[:, :2]
        inv = 1.0 / ((d * d).sum(axis=1) + 1e-12)
        dx, dy = d[:, 0, None, None], d[:, 1, None, None]
        # t = clip(((x - x0) dx + (y - y0) dy) / L2, 0, 1) on (g, h, w); distance to x0 + t d
        t = (ey * (d[:, 1] * inv)[:, None])[:, :, None] + (ex * (d[:, 0] * inv)[:, None])[:, None, :]
        _clip01(t)
        qx = t * dx
        np.subtract(ex[:, None, :], qx, out=qx)
        t *= dy
        np.subtract(ey[:, :, None], t, out=t)
        qx *= qx
        t *= t
        qx += t
        np.sqrt(qx, out=qx)
        # value * ramp(width - dist, soft)
        if len(set(widths)) == 1:
            qx *= -1.0 / softs[0]
            qx += widths[0] / softs[0] + 0.5
        else:
            k = np.array([-1.0 / v for v in softs], np.float32)[:, None, None]
            qx *= k
            qx += np.array([wd / sf + 0.5 for wd, sf in zip(widths, softs)], np.float32)[:, None, None]
        _clip01(qx)
        if np.ndim(value) != 0:
            qx *= np.asarray(value, np.float32)[:, None, None]
        elif value != 1.0:
            qx *= value
        for k in range(g):
            a, b, c, e = r0s[k], r1s[k], c0s[k], c1s[k]
            a_, b_, c_, e_ = max(a, 0), min(b, S), max(c, 0), min(e, S)
            if a_ >= b_ or c_ >= e_:
                continue
            sub = layer[a_:b_, c_:e_]
            np.maximum(sub, qx[k, a_ - a:b_ - a, c_ - c:e_ - c], out=sub)

    def arange_px(self, n: int) -> np.ndarray:
        """0, px, 2 px, ... (n values, float32), from a cache that grows as needed."""
        if n > len(self._ar):
            self._ar = np.arange(2 * n, dtype=np.float32) * np.float32(self.px)
        return self._ar


def _clip01(a: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place."""
    return _clip(a, 0.0, 1.0, out=a)


@lru_cache(maxsize=8)
def _canvas(size: int) -> _Canvas:
    return _Canvas(size)


def _bezier(p0, p1, p2, n=12):
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2).astype(np.float32)


def _box(layer: np.ndarray, thr: float = 0.0):
    """Row and column slices of the bounding box of `layer > thr` (None if empty)."""
    m = layer > thr
    r = np.flatnonzero(m.any(axis=1))
    if r.size == 0:
        return None
    c = np.flatnonzero(m[r[0]:r[-1] + 1].any(axis=0))
    return slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)


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
        tc = _clip(t, 0.0, 1.0)
        xc = 0.39 + 0.06 * tc
        hw = (self.lat[side] - 0.45) * (tc * (2 - tc)) ** 0.55
        return xc, hw


def _sides(side):
    return ("right", "left") if side in ("bilateral", "") else (side,)


def _sgn(side):
    return -1.0 if side == "right" else 1.0


# ----------------------------------------------------------------------------- per-size caches
def _frozen(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@lru_cache(maxsize=8)
def _hilar_fields(S: int) -> dict:
    """Grid-only parts of the lung markings: the angle around each hilum (the right hilum
    on the right half, the left on the left) as cos/sin of 22x, and the radial weights."""
    cv = _canvas(S)
    x, y = cv.x.astype(np.float64), cv.y.astype(np.float64)
    sg = np.where(x < 0, -1.0, 1.0)[None, :]
    X = x[None, :] - sg * 0.22
    Y = np.broadcast_to((y - 0.86)[:, None], (S, S))
    rr = np.sqrt(X * X + Y * Y)
    ang = np.arctan2(Y, X * sg)
    out = dict(c22=np.cos(22 * ang), s22=np.sin(22 * ang), near=0.5 * _clip(rr / 0.2, 0, 1),
               fall=0.15 + 0.9 * np.exp(-rr / 0.3))
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    _frozen(*out.values())
    return out


@lru_cache(maxsize=16)
def _bronchogram_fields(S: int, sg: float):
    """cos/sin of 18x the angle around the hilum on side `sg` (air bronchograms), full frame."""
    cv = _canvas(S)
    X, Y = cv.x.astype(np.float64)[None, :] - sg * 0.22, cv.y.astype(np.float64)[:, None] - 0.86
    ang = np.arctan2(np.broadcast_to(Y, (S, S)), X * sg)
    return _frozen(np.cos(18 * ang).astype(np.float32), np.sin(18 * ang).astype(np.float32))


@lru_cache(maxsize=8)
def _frontal_static(S: int):
    """Anatomy-independent parts of the frontal: trachea + hila density, spine bone (+ its columns)."""
    cv = _canvas(S)
    x, y = cv.x, cv.y
    D = np.zeros((S, S), np.float32)
    tr = np.zeros((S, S), np.float32)
    carina = 0.64
    cv.polyline(tr, [(0.0, 0.0), (0.01, carina)], 0.035, 1.0)
    cv.polyline(tr, [(0.01, carina), (-0.14, carina + 0.14)], 0.022, 1.0)
    cv.polyline(tr, [(0.01, carina), (0.17, carina + 0.17)], 0.022, 1.0)
    D -= 0.16 * tr
    for sg in (-1.0, 1.0):  # hilar shadows
        cv.gauss(D, sg * 0.23, 0.88, 0.05, 0.09, 0.16)
        cv.gauss(D, sg * 0.2, 0.80, 0.03, 0.05, 0.08)
    # spine: vertebral bodies with endplates and pedicles
    sc = cv.cols(-0.09, 0.09)
    xs = x[sc]
    col = _ramp(0.065 - np.abs(xs), 2 * cv.px)
    phase = (y - 0.05) / 0.115
    ends = (np.abs(phase - np.round(phase)) < 0.12).astype(np.float32)
    ped = np.exp(-((np.abs(xs) - 0.045) / 0.015) ** 2)[None, :] * (0.5 + 0.5 * np.cos(2 * np.pi * phase))[:, None]
    spine = ((col[None, :] * (0.9 + 0.4 * ends[:, None]) + 0.6 * ped)
             * _clip((y[:, None] - 0.1) / 0.2, 0.3, 1)).astype(np.float32)
    _frozen(D, spine)
    return D, spine, sc


@lru_cache(maxsize=16)
def _shoulder_girdle(S: int, ap: bool):
    """Clavicles and scapular edges (they depend on the view only), on the rows they cover."""
    cv = _canvas(S)
    bone = np.zeros((S, S), np.float32)
    for s in (-1, 1):  # clavicles
        pts = _bezier((s * 0.07, 0.36 + (0.02 if ap else 0.05)), (s * 0.35, 0.30), (s * 0.68, 0.22), 6)
        cv.polyline(bone, pts, 0.03, 1.3)
        # scapular edge (more over the lungs on AP films)
        sx = 0.70 if ap else 0.80
        cv.polyline(bone, _bezier((s * 0.86, 0.30), (s * sx, 0.6), (s * (sx + 0.06), 0.95), 5), 0.012, 0.5)
    rs = _box(bone)[0]
    return _frozen(np.ascontiguousarray(bone[rs]))[0], rs


@lru_cache(maxsize=8)
def _vignette(S: int) -> np.ndarray:
    g = (np.arange(S, dtype=np.float32) + 0.5) * (2.0 / S)
    v = (1.0 - 0.10 * (g[:, None] - 1.0) ** 2 - 0.06 * (g[None, :] - 1.0) ** 2).astype(np.float32)
    return _frozen(v)[0]


# ----------------------------------------------------------------------------- acquisition
def _internal_size(size: int) -> int:
    """Anatomy is drawn at half the output size above 160 px (4x fewer pixel operations);
    the positioning transform upsamples it and the grain is added at full size."""
    return size if size <= 160 else (size + 1) // 2


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Exact 2x bilinear upsampling (PIL's resize, edges clamped), done separably in numpy."""
    S = a.shape[0]
    pad = np.empty((S + 2, S), np.float32)
    pad[1:-1] = a
    pad[0] = a[0]
    pad[-1] = a[-1]
    q = a * 0.75
    r = np.empty((S, 2, S), np.float32)
    np.multiply(pad[:-2], 0.25, out=r[:, 0])
    r[:, 0] += q
    np.multiply(pad[2:], 0.25, out=r[:, 1])
    r[:, 1] += q
    r = r.reshape(2 * S, S)
    padc = np.empty((2 * S, S + 2), np.float32)
    padc[:, 1:-1] = r
    padc[:, 0] = r[:, 0]
    padc[:, -1] = r[:, -1]
    q = r * 0.75
    o = np.empty((2 * S, S, 2), np.float32)
    np.multiply(padc[:, :-2], 0.25, out=o[:, :, 0])
    o[:, :, 0] += q
    np.multiply(padc[:, 2:], 0.25, out=o[:, :, 1])
    o[:, :, 1] += q
    return o.reshape(2 * S, 2 * S)


def _affine(I: np.ndarray, rot_deg: float, zoom: float, shift_x: float, shift_y: float) -> np.ndarray:
    """Rotate/zoom/shift the square image `I` about its centre (bilinear, 0 outside).

    Numpy gathers: about twice as fast as PIL's affine transform at these sizes, and the
    same values inside the frame."""
    S = I.shape[0]
    c, s_ = math.cos(math.radians(rot_deg)) / zoom, math.sin(math.radians(rot_deg)) / zoom
    cx = cy = S / 2
    tx, ty = shift_x * S / 2, shift_y * S / 2
    # output pixel centre (u, v) -> input position (inverse affine around the centre), in pixel indices
    u = np.arange(S, dtype=np.float32) + 0.5
    xin = np.add.outer(u * -s_, u * c + (cx - c * (cx + tx) + s_ * (cy + ty) - 0.5))
    yin = np.add.outer(u * c, u * s_ + (cy - s_ * (cx + tx) - c * (cy + ty) - 0.5))
    _clip(xin, -1.0, S - 0.001, out=xin)  # beyond the edge: the zero border
    _clip(yin, -1.0, S - 0.001, out=yin)
    x0, y0 = np.floor(xin), np.floor(yin)
    xin -= x0
    yin -= y0
    W = S + 2
    pad = np.zeros((W, W), np.float32)
    pad[1:-1, 1:-1] = I
    flat = pad.ravel()
    idx = y0.astype(np.intp)
    idx *= W
    idx += x0.astype(np.intp)
    idx += W + 1
    a, b = flat.take(idx), flat.take(idx + 1)
    idx += W
    c_, d = flat.take(idx), flat.take(idx + 1)
    b -= a
    b *= xin
    a += b
    d -= c_
    d *= xin
    c_ += d
    c_ -= a
    c_ *= yin
    a += c_
    return a


def _affine_to(I: np.ndarray, out: int, rot_deg: float, zoom: float, shift_x: float, shift_y: float) -> np.ndarray:
    """Rotate/zoom/shift `I` about the centre onto an (out, out) grid with PIL (any scale)."""
    R = I.shape[0]
    k = R / out
    c, s_ = math.cos(math.radians(rot_deg)) / zoom, math.sin(math.radians(rot_deg)) / zoom
    cx = cy = out / 2
    tx, ty = shift_x * out / 2, shift_y * out / 2
    # output pixel -> input pixel (inverse affine around the centre, then the scale to the drawing grid)
    coeffs = tuple(k * v for v in (c, -s_, cx - c * (cx + tx) + s_ * (cy + ty),
                                   s_, c, cy - s_ * (cx + tx) - c * (cy + ty)))
    return np.asarray(Image.fromarray(I, mode="F").transform((out, out), Image.AFFINE, coeffs,
                                                             resample=Image.BILINEAR), dtype=np.float32)


_LUT_D = np.linspace(0.0, 1.6, 1025, dtype=np.float32)


def _acquire(D: np.ndarray, a: Anatomy, size: int, grain: np.ndarray, rot_deg: float, zoom: float,
             shift_x: float, shift_y: float) -> np.ndarray:
    """Vignetting, exposure curve, positioning (rotation, zoom, shift, upsampling), grain -> uint8.

    The exposure is applied on the drawing grid and the brightness is then positioned (at
    that resolution) and upsampled: a separable 2x upsampling costs far less than warping
    straight onto the output grid."""
    S = D.shape[0]
    D *= _vignette(S)
    # exposure: 1 - exp(-gain * D), normalised and gamma-shaped, in 0..255 (+0.5 for rounding)
    lut = np.multiply(_LUT_D, -a.gain)
    np.exp(lut, out=lut)
    lut *= -1.0 / (1.0 - math.exp(-a.gain * 1.1))
    lut += 1.0 / (1.0 - math.exp(-a.gain * 1.1))
    _clip(lut, 0.0, 1.0, out=lut)
    if a.gamma != 1.0:
        np.power(lut, np.float32(a.gamma), out=lut)
    lut *= 255.0
    lut += 0.5
    D *= 1024 / 1.6
    _clip(D, 0, 1024, out=D)
    I = lut.take(D.astype(np.intp))
    if size == 2 * S:
        I = _upsample2(_affine(I, rot_deg, zoom, shift_x, shift_y))
    elif size == S:
        I = _affine(I, rot_deg, zoom, shift_x, shift_y)
    else:
        I = _affine_to(I, size, rot_deg, zoom, shift_x, shift_y)
    # grain: uniform, +-1.5 * noise of the full scale, from one random byte per pixel
    g = np.multiply(grain.reshape(size, size),
                    np.float32(3.0 * a.noise * 255.0 / 256.0), dtype=np.float32)
    g += I
    _clip(g, 0, 255, out=g)
    return g.astype(np.uint8)


def _grain_bytes(rng: np.random.Generator, size: int) -> np.ndarray:
    """size * size random int8 values straight from the bit generator (cheapest source)."""
    n = size * size
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.int8)[:n]


class _LazyRngs:
    """The per-finding generators, created from their seeds on first use."""

    def __init__(self, seeds):
        self.seeds = seeds
        self.made = {}

    def __getitem__(self, i):
        g = self.made.get(i)
        if g is None:
            g = self.made[i] = np.random.default_rng(int(self.seeds[i]))
        return g


_TISSUE, _LUNG_AIR, _BONE, _METAL = 0.56, 0.40, 0.12, 0.9


def render_study(spec: StudySpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal (PA/AP) radiograph of `spec` as a (size, size) uint8 array."""
    a = spec.anatomy
    S = _internal_size(size)
    cv = _canvas(S)
    # all randomness first, in a fixed order (see the module docstring)
    grain = _grain_bytes(rng, size)
    fields = _Fields(S, rng)
    fr = _LazyRngs(rng.integers(0, 2**31, 16))

    th = _Thorax(a, spec.findings)
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


# ----------------------------------------------------------------------------- findings
def _zone_rows(th, side, zone):
    t = ZONE_T.get(zone, 0.6)
    return th.y_of_t(side, t), t


def _apply_box(layer):
    """The bounding box of what was drawn into `layer`, with that part clipped to [0, 1]."""
    box = _box(layer)
    if box is None:
        return None
    sub = layer[box]
    _clip(sub, 0.0, 1.0, out=sub)
    return box, sub


def _draw_lung_finding(f, cv, th, air, extra, ptx_rim, fields, rng):
    o, m = f.observation, SEVERITY_SCALE.get(f.severity, 2.0)
    if f.uncertain:
        m = max(1.0, m - 0.5)
    S, x, y = cv.S, cv.x, cv.y
    if o == "Pleural Effusion":
        h = {1.0: 0.07, 1.5: 0.12, 2.0: 0.22, 3.0: 0.46}.get(m, 0.22)
        for side in _sides(f.side):
            cs = cv.side_cols(side)
            ax = cv.ax[cs]
            C, L = th.cp[side], th.lat[side]
            level = C - h - 0.5 * h * _clip((ax - 0.25) / (L - 0.25), 0, 1) ** 2
            r0 = cv.rows(float(level.min()), 2.0).start  # nothing changes above the fluid level
            # air *= 1 - 0.95 clip((y - level) / 0.05, 0, 1)
            fl = np.subtract.outer(y[r0:] / 0.05, level / 0.05)
            _clip(fl, 0.0, 1.0, out=fl)
            fl *= -0.95
            fl += 1.0
            air[r0:, cs] *= fl
    elif o == "Pneumothorax":
        w = {1.0: 0.05, 1.5: 0.07, 2.0: 0.10, 3.0: 0.2}.get(m, 0.1)
        for side in _sides(f.side):
            cs = cv.side_cols(side)
            ax = cv.ax[cs]
            t = th.t(side, y)
            xc, hw = th.centre_hw(side, t)
            taper = _clip(1.25 - t, 0.1, 1.0)  # apicolateral in the upright patient
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
        lines = np.zeros((S, S), np.float32)
        kerley = []
        for side in ("right", "left"):
            sg = _sgn(side)
            cs = cv.side_cols(side)
            gx = np.exp(-0.5 * ((x[cs] - sg * 0.3) / 0.22) ** 2)
            gy = np.exp(-0.5 * ((y - 0.95) / 0.32) ** 2)
            haze = np.multiply.outer(gy, gx)
            haze *= 0.4 * fields.get(fields.TEX, cs=cs) + 0.8
            _clip(haze, 0, 1, out=haze)
            haze *= -(0.22 + 0.14 * m)
            haze += 1.0
            air[:, cs] *= haze
            # Kerley B lines: short horizontal lines at the lateral lung bases
            for k in range(int(3 + 2 * m)):
                yy = th.y_of_t(side, 0.72 + 0.045 * k + rng.uniform(-0.01, 0.01))
                t = th.t(side, yy)
                xc, hw = th.centre_hw(side, np.array([t]))
                edgex = float(xc[0] + hw[0]) - 0.01
                kerley.append((sg * (edgex - 0.07), yy, sg * edgex, yy))
        cv.segments(lines, kerley, 0.006, 1.0)
        box = _box(lines)
        if box is not None:  # drawn where the lung is still aerated
            extra[box] += 0.10 * lines[box] * (air[box] > 0.3)
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
            # a gaussian region (3 sigma box) broken up by the patch field
            sx, sy = rx * 0.7, ry * 0.7
            rs, cs = cv.rows(cy - 3 * sy, cy + 3 * sy), cv.cols(cx - 3 * sx, cx + 3 * sx)
            if rs.start >= rs.stop or cs.start >= cs.stop:
                continue
            gx = np.exp(-0.5 * ((x[cs] - cx) / sx) ** 2)
            gy = np.exp(-0.5 * ((y[rs] - cy) / sy) ** 2)
            region = np.multiply.outer(gy, gx)
            patch = fields.get(fields.PATCH, rs=rs, cs=cs)
            if o == "Consolidation":
                region *= 2.2
                region += 0.3 * patch - 0.4
            else:
                region *= 0.9 * patch + 1.2
                region -= 0.1
            _clip(region, 0, 1, out=region)
            air[rs, cs] *= 1.0 - dens * region
            if o in ("Consolidation", "Pneumonia"):  # air bronchograms: dark branches
                box = _box(region, 0.6)
                if box is not None:
                    br_r, br_c = box
                    rs2 = slice(rs.start + br_r.start, rs.start + br_r.stop)
                    cs2 = slice(cs.start + br_c.start, cs.start + br_c.stop)
                    c18, s18 = _bronchogram_fields(S, sg)
                    # (0.5 + 0.5 cos(18 ang + 0.5 tex)) ** 16
                    br = c18[rs2, cs2] * fields.get(fields.TEX, "cos05", rs2, cs2)
                    br -= s18[rs2, cs2] * fields.get(fields.TEX, "sin05", rs2, cs2)
                    br *= 0.5
                    br += 0.5
                    for _ in range(4):
                        br *= br
                    br *= region[br_r, br_c] > 0.6
                    br *= 0.10
                    extra[rs2, cs2] -= br
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
            plate = (cx - L, cy - 0.03 + tilt, cx + L, cy - 0.03 - tilt)
            if m >= 2:
                cv.segments(band, [plate, (cx - 0.7 * L, cy + 0.06, cx + 0.7 * L, cy + 0.07)],
                            [0.012 + 0.006 * m, 0.01 + 0.004 * m], 1.0)
                cv.gauss(band, cx, cy + 0.06, L * 0.6, 0.05, 0.5 * (m - 1))
            else:
                cv.segments(band, [plate], 0.012 + 0.006 * m, 1.0)
            drawn = _apply_box(band)
            if drawn is not None:
                box, b = drawn
                air[box] *= 1.0 - 0.85 * b
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
            drawn = _apply_box(blob)
            if drawn is not None:
                box, b = drawn
                air[box] *= 1.0 - 0.9 * b
                extra[box] += 0.08 * b
    elif o == "Pleural Other":
        for side in _sides(f.side):
            cs = cv.side_cols(side)
            ax = cv.ax[cs]
            t = th.t(side, y)
            xc, hw = th.centre_hw(side, t)
            dlat = (xc + hw)[:, None] - ax[None, :]
            thick = 0.03 + 0.012 * m
            if f.zone == "apex":
                zsel = _clip((0.35 - t) / 0.1, 0, 1)
            else:
                zsel = _clip(1 - np.abs(t - 0.6) / 0.35, 0, 1)
            wav = thick * (0.7 + 0.5 * fields.get(fields.TEX, cs=cs))
            plaque = _ramp(wav - dlat, 1.5 * cv.px) * zsel[:, None]
            air[:, cs] *= 1.0 - 0.9 * plaque
            extra[:, cs] += 0.12 * plaque * (dlat < wav * 0.6)
    # Fracture and Support Devices are drawn with the bones / metal


def _rib_field(cv, ax, y0, step, n, g, dg, half, lo, hi, rs=slice(None)):
    """All ribs of one family at once: rib k runs along y = y0 + k*step + g(|x|)*(1 + 0.08k).

    Returns the rib brightness on rows `rs` x the columns of `ax`, the rib index k of each
    pixel (clipped to 0..n-1: farther pixels are far from every rib) and the phase."""
    yy = cv.y[rs]
    kk = _clip((yy - y0) / step, 0, n - 1)
    phase = np.multiply.outer(1 + 0.08 * kk, g / step)
    np.subtract(((yy - y0) / step)[:, None], phase, out=phase)
    k = np.rint(phase)
    _clip(k, 0, n - 1, out=k)
    d = phase - k
    np.abs(d, out=d)
    d *= (step / np.sqrt(1 + dg * dg)).astype(np.float32)[None, :]
    # ramp(half - d, soft) * (lo < |x| < hi)
    soft = 1.5 * cv.px
    inside = d * (-1.0 / soft)
    inside += half / soft + 0.5
    _clip(inside, 0.0, 1.0, out=inside)
    inside *= ((lo < ax) & (ax < hi)).astype(np.float32)[None, :]
    # brighter cortex at the rib edges: 0.6 + 0.5 (d / half)^2
    d *= d
    d *= 0.5 / (half * half)
    d += 0.6
    d *= inside
    return d, k, phase


def _draw_ribs(cv, th, findings):
    """The rib cage as a new bone layer: posterior ribs (with fractures), faint anterior ribs."""
    a = th.a
    step = a.rib_step
    ax = cv.ax
    # posterior ribs: short rise from the spine, then a lateral downward sweep (both sides at once)
    s_ = _clip((ax - 0.05) / 0.82, 0, 1.2)
    g = -0.16 * s_ + 0.55 * s_ ** 2
    dg = (-0.16 + 1.1 * s_) / 0.82
    bone, _, _ = _rib_field(cv, ax, a.rib_y0, step, 10, g, dg, 0.03, 0.0, a.lung_lat + 0.07)
    fractures = [f for f in findings if f.observation == "Fracture"]
    for side in ("right", "left"):
        mine = [(j, f) for j, f in enumerate(fractures) if side in _sides(f.side)]
        if not mine:
            continue
        cs = cv.side_cols(side)
        axs, gs, dgs = ax[cs], g[cs], dg[cs]
        val, k, _ = _rib_field(cv, axs, a.rib_y0, step, 10, gs, dgs, 0.03, 0.0, a.lung_lat + 0.07)
        for j, f in mine:
            kf = {"apex": 2, "upper": 3, "middle": 5, "lower": 7, "base": 8}.get(f.zone, 5 + j % 3)
            uf = 0.55 + 0.08 * (j % 3)
            lateral = (axs > uf)[None, :]
            # remove the rib beyond the break and redraw it displaced, with a gap at the break
            val = val * ~((k == kf) & lateral)
            disp = 0.024 * (1 + 0.08 * kf)
            v2, k2, _ = _rib_field(cv, axs, a.rib_y0 + disp, step, 10, gs, dgs, 0.03, uf + 0.02, a.lung_lat + 0.07)
            val = np.maximum(val * ~((k == kf) & (np.abs(axs - uf) < 0.02)[None, :]), v2 * (k2 == kf))
        bone[:, cs] = val
    # anterior ribs: faint, running down towards the midline (only on the rows they reach)
    sa = _clip((ax - 0.25) / 0.6, 0, 1)
    ga = 0.18 * (1 - sa) - 0.1 * (1 - sa) ** 2 - 0.05 * sa
    dga = (-0.18 + 0.2 * (1 - sa) - 0.05) / 0.6
    y0a, stepa = a.rib_y0 + 0.05 + 1.2 * step, 1.2 * step
    lo_g, hi_g = float(ga.min()), float(ga.max())
    rs = cv.rows(y0a + 1.4 * min(lo_g, 0.0) - stepa, y0a + 5 * stepa + 1.4 * max(hi_g, 0.0) + stepa)
    va, _, _ = _rib_field(cv, ax, y0a, stepa, 6, ga, dga, 0.022, 0.28, a.lung_lat, rs=rs)
    va *= 0.35
    bone[rs] += va
    return bone


def _segs(pts) -> np.ndarray:
    """The segments (x0, y0, x1, y1) of a polyline."""
    pts = np.asarray(pts, dtype=np.float32).reshape(-1, 2)
    return np.concatenate([pts[:-1], pts[1:]], axis=1)


@lru_cache(maxsize=8)
def _sternal_wires(S: int):
    """The sternotomy wires (they do not depend on the anatomy) and the rows they cover."""
    cv = _canvas(S)
    metal = np.zeros((S, S), np.float32)
    for k in range(6):
        yy = 0.62 + k * 0.1
        cv.blob(metal, 0.0, yy, 0.035, 0.018, 1.0, soft=cv.px)
        cv.blob(metal, 0.0, yy, 0.02, 0.008, -0.9, soft=cv.px)
    rs = cv.rows(0.62 - 0.05, 0.62 + 0.5 + 0.05)
    return _frozen(np.ascontiguousarray(metal[rs]))[0], rs


def _draw_device(f, cv, th, metal, rng):
    kind = f.kind or "central_line"
    sg = -1.0 if f.side == "right" else 1.0
    carina = 0.64
    if kind == "ett":
        tip = carina - rng.uniform(0.06, 0.14)
        # the tube (wide, faint) and its radio-opaque stripe
        cv.segments(metal, [(0.0, 0.0, 0.005, tip), (-0.01, 0.0, -0.005, tip)], [0.022, 0.005], [0.18, 0.7])
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
        leads = [np.concatenate([_bezier((gx, gy), (sg * 0.2, 0.2), (-0.03, 0.6), 8),
                                 _bezier((-0.03, 0.6), (-0.15, 0.85), ra, 8)[1:]]),
                 np.concatenate([_bezier((gx, gy), (sg * 0.25, 0.25), (0.0, 0.62), 8),
                                 _bezier((0.0, 0.62), (-0.1, th.hy + 0.05), rv, 8)[1:]])]
        cv.segments(metal, np.concatenate([_segs(p) for p in leads]), 0.007, 0.8)
    elif kind == "sternal_wires":
        wires, rs = _sternal_wires(cv.S)
        metal[rs] += wires
    elif kind == "chest_tube":
        base = (sg * 0.9, th.cp["left" if sg > 0 else "right"] - 0.05)
        seg = _segs(_bezier(base, (sg * 0.7, 0.7), (sg * 0.42, 0.35), 12))
        n = len(seg)
        # the tube and its radio-opaque stripe
        cv.segments(metal, np.concatenate([seg, seg]), [0.014] * n + [0.004] * n, [0.35] * n + [0.6] * n)


# ----------------------------------------------------------------------------- lateral view
@lru_cache(maxsize=8)
def _lateral_static(S: int):
    """Anatomy-independent parts of the lateral: spine + sternum bone, trachea density."""
    cv = _canvas(S)
    x, y = cv.x, cv.y
    # spine: vertebral bodies behind the lungs, with disc spaces
    sc = cv.cols(0.55, 0.9)
    phase = (y - 0.05) / 0.12
    disc = np.abs(phase - np.round(phase)) < 0.1
    col = _ramp(np.minimum(x[sc] - 0.6, 0.78 - x[sc]), 2 * cv.px)
    bone = np.zeros((S, S), np.float32)
    bone[:, sc] += col[None, :] * (1.0 - 0.5 * disc[:, None]) * (y > 0.1)[:, None]
    cv.polyline(bone, _bezier((-0.7, 0.35), (-0.78, 0.8), (-0.74, 1.25), 6), 0.025, 0.8)  # sternum
    tr = np.zeros((S, S), np.float32)
    cv.polyline(tr, [(-0.25, 0.0), (-0.05, 0.75)], 0.04, 1.0)
    tr *= -0.14
    return _frozen(bone, tr)


@lru_cache(maxsize=8)
def _lateral_rib_shape(S: int):
    """The lateral rib arc as a graph over the columns it spans: its y offset g(x), the
    factor cos(slope) turning a vertical distance into a distance to the curve, a column
    mask and the column slice."""
    cv = _canvas(S)
    t = np.linspace(0.0, 1.0, 257)
    p0, p1, p2 = np.array([0.75, 0.0]), np.array([0.1, 0.05]), np.array([-0.6, 0.35])
    pts = (1 - t)[:, None] ** 2 * p0 + (2 * (1 - t) * t)[:, None] * p1 + (t ** 2)[:, None] * p2
    der = 2 * (1 - t)[:, None] * (p1 - p0) + 2 * t[:, None] * (p2 - p1)
    order = np.argsort(pts[:, 0])
    cs = cv.cols(-0.6, 0.75)
    xs = cv.x[cs].astype(np.float64)
    g = np.interp(xs, pts[order, 0], pts[order, 1])
    slope = np.interp(xs, pts[order, 0], der[order, 1] / der[order, 0])
    inside = ((xs >= -0.6) & (xs <= 0.75)).astype(np.float32)
    return g.astype(np.float32), (1.0 / np.sqrt(1 + slope ** 2)).astype(np.float32), inside, cs


def _lateral_ribs(cv, bone, y0, step, n, width, value):
    """Max-combine n faint rib arcs (rib k along y = y0 + k step + g(x)) into `bone`, all at once."""
    g, cosv, inside, cs = _lateral_rib_shape(cv.S)
    soft = max(cv.px, width * 0.5)
    rs = cv.rows(y0 - width - soft, y0 + (n - 1) * step + float(g.max()) + width + soft)
    phase = np.subtract.outer((cv.y[rs] - y0) / step, g / step)
    k = np.rint(phase)
    _clip(k, 0, n - 1, out=k)
    phase -= k
    np.abs(phase, out=phase)
    # value * ramp(width - distance, soft), distance = |phase| step cos(slope)
    phase *= (-step / soft) * cosv[None, :]
    phase += width / soft + 0.5
    _clip(phase, 0.0, 1.0, out=phase)
    phase *= (value * inside)[None, :]
    sub = bone[rs, cs]
    np.maximum(sub, phase, out=sub)


def render_lateral(spec: StudySpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """A simple left lateral view of `spec` (anterior to the viewer's left) as uint8.

    Coarser than the frontal: body, lungs, heart, spine, sternum, trachea, domes and
    posterior sulci; effusion, cardiomegaly, lung densities, edema and the larger
    devices are shown; pneumothorax, fracture and pleural thickening are not.
    """
    a = spec.anatomy
    S = _internal_size(size)
    cv = _canvas(S)
    grain = _grain_bytes(rng, size)
    fields = _Fields(S, rng)
    fr = _LazyRngs(rng.integers(0, 2**31, 16))
    th = _Thorax(a, spec.findings)
    x, y = cv.x, cv.y
    soft = 1.5 * cv.px
    # body: antero-posterior thickness, thinner at the neck
    front = np.where(y < 0.3, -0.35 - 0.4 * _clip(y / 0.3, 0, 1), -0.75 - 0.05 * _clip((y - 0.3) / 1.0, 0, 1))
    back = np.where(y < 0.3, 0.55 + 0.3 * _clip(y / 0.3, 0, 1), 0.88)
    D = np.minimum(np.subtract.outer(-front.astype(np.float32), -x), np.subtract.outer(back.astype(np.float32), x))
    _ramp_(D, 3 * cv.px)
    D *= _TISSUE * 0.95
    cv.blob(D, -0.25, 0.45, 0.45, 0.3, 0.12, soft=0.15)  # arms
    # lung: one field between sternum and spine, above the domes
    dome = th.dome["right"] - 0.12
    cp_post = th.cp["right"] + 0.08
    top = a.apex_y + 0.05
    t = _clip((y - top) / (cp_post - top), 0, 1)
    ant = np.where(y > top, -0.62 + 0.25 * (1 - t) ** 3, 9.0).astype(np.float32)  # nothing above the apex
    post = (0.58 - 0.25 * (1 - t) ** 3).astype(np.float32)
    xr = (x + 0.62) / 1.2
    ydome = dome - 0.04 + (cp_post - dome) * _clip((xr - 0.45) / 0.55, 0, 1) ** 2
    ydome = (ydome + 0.10 * _clip((0.25 - xr) / 0.25, 0, 1)).astype(np.float32)
    air = np.minimum(np.subtract.outer(-ant, -x), np.subtract.outer(post, x))
    _ramp_(air, soft)
    air *= _ramp_(np.subtract.outer(-y, -ydome), soft)
    # heart: anterior and inferior, resting on the domes
    hr = th.hrx * 1.05
    heart = np.zeros((S, S), np.float32)
    cv.blob(heart, -0.66 + hr * 0.85, dome + 0.02 - 0.15, hr * 0.85, 0.3, 1.0, soft=0.02)
    drawn = _apply_box(heart)
    if drawn is not None:
        box, hsub = drawn
        air[box] *= 1 - hsub
    # hilum / vessels
    cv.gauss(D, 0.05, 0.85, 0.12, 0.12, 0.12)
    extra = np.zeros((S, S), np.float32)
    for i, f in enumerate(spec.findings):
        o, m = f.observation, SEVERITY_SCALE.get(f.severity, 2.0)
        if o == "Pleural Effusion":  # fluid fills the posterior sulcus first, meniscus up the back
            h = {1.0: 0.08, 1.5: 0.12, 2.0: 0.2, 3.0: 0.4}.get(m, 0.2) * (1.2 if f.side == "bilateral" else 1.0)
            xc = _clip(xr, 0, 1)
            level = (cp_post - h - 0.25 * h * xc + 0.5 * h * (1 - xc)).astype(np.float32)
            r0 = cv.rows(float(level.min()), 2.0).start
            fl = np.subtract.outer(y[r0:] / 0.05, level / 0.05)
            _clip(fl, 0.0, 1.0, out=fl)
            fl *= -0.95
            fl += 1.0
            air[r0:] *= fl
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
                box = _box(reg)
                if box is not None:
                    sub = reg[box]
                    sub *= 0.8 * fields.get(fields.TEX, rs=box[0], cs=box[1]) + 1.3
                    sub -= 0.2
            drawn = _apply_box(reg)
            if drawn is not None:
                box, sub = drawn
                air[box] *= 1 - (0.8 if o != "Lung Opacity" else 0.5) * sub
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
    # bones: the static spine and sternum, rib arcs faint and overlapping
    static_bone, trachea = _lateral_static(S)
    bone = static_bone.copy()
    _lateral_ribs(cv, bone, a.rib_y0 + 0.1, a.rib_step, 9, 0.018, 0.25)
    bone *= _BONE
    D += bone
    D += trachea
    D += extra
    # aerated lung, less where vessels run: lung_air 0.95 air (1 - 0.5 * 0.8 ridge(vessel))
    marks = fields.get(fields.VESSEL, "ridge") * (-0.4 * _LUNG_AIR * 0.95)
    marks += _LUNG_AIR * 0.95
    marks *= air
    D -= marks
    return _acquire(D, a, size, grain, a.rot_deg * 0.5, 1.0, 0.0, 0.0)
