"""Drawing primitives of the phantom: the pixel grid, smooth random fields, thorax geometry.

Coordinates: x in [-1, 1] from the viewer's left to right, y in [0, 2] from top to
bottom (1 unit = half the image side). Radiological convention: the patient's right
is on the viewer's left, so side "right" is x < 0.

Everything here depends on the pixel grid (and the anatomy) only, never on a study's
rng; the grid-only parts are computed once per size and cached, read-only.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

try:  # the ufunc behind np.clip, without np.clip's Python-level argument handling (~5 us a call)
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - other numpy layouts
    _clip = np.clip

from .spec import SEVERITY_SCALE, Anatomy

# Densities of the materials the picture is built from (soft tissue, aerated lung, bone, metal).
_TISSUE, _LUNG_AIR, _BONE, _METAL = 0.56, 0.40, 0.12, 0.9


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
