"""Drawers of the frontal findings: lung aeration changes, ribs (with fractures), devices.

Each drawer adds into layers the frontal renderer owns (aerated lung, extra density,
bone, metal), with the canvas primitives of `canvas`, and takes randomness
only from the generator it is handed.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .canvas import (_bezier, _box, _bronchogram_fields, _canvas, _clip, _frozen, _ramp, _sgn,
                             _sides)
from .spec import SEVERITY_SCALE, ZONE_T


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
