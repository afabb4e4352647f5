"""Acquisition of a drawn density map: exposure, positioning, upsampling and grain -> uint8.

Also the per-study randomness that every view shares (grain bytes, per-finding
generators), so the frontal and the lateral are made the same way.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .canvas import _canvas, _clip, _Fields, _frozen, _Thorax
from .spec import Anatomy


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


def _start_view(spec, size: int, rng: np.random.Generator):
    """What every view draws from first: canvas, then all per-study randomness in a fixed order.

    Returns (internal size S, canvas, grain bytes, texture fields, lazy per-finding rngs, thorax).
    """
    S = _internal_size(size)
    cv = _canvas(S)
    grain = _grain_bytes(rng, size)
    fields = _Fields(S, rng)
    fr = _LazyRngs(rng.integers(0, 2**31, 16))
    return S, cv, grain, fields, fr, _Thorax(spec.anatomy, spec.findings)
