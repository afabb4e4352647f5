"""The lateral view of a phantom study (simpler than the frontal; see `render_lateral`)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .acquire import _acquire, _start_view
from .canvas import (_BONE, _LUNG_AIR, _TISSUE, _bezier, _box, _canvas, _clip, _frozen, _ramp, _ramp_)
from .findings import _apply_box
from .spec import SEVERITY_SCALE, ZONE_T, StudySpec


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
    S, cv, grain, fields, fr, th = _start_view(spec, size, rng)
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
