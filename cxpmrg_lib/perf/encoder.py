"""Training throughput of the Vision Mamba encoder against a ViT of the same width, depth and patch.

`cxpmrg perf encoder` runs it: one training step (forward, backward, AdamW update)
of each encoder at several input sizes, in the same process, so the ratios are
fair on a noisy machine. Attention costs grow with the square of the token count;
a selective scan grows linearly, which is the point of the comparison.
"""
from __future__ import annotations

import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.util.fileio import write_json
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba, sincos_pos_embed_2d
from cxpmrg_lib.presets import get_preset
from cxpmrg_lib.trainer import adamw

log = logging.getLogger(__name__)

__all__ = ["ViTEncoder", "benchmark_encoder", "format_encoder_table"]


class ViTEncoder(nn.Module):
    """A plain pre-norm ViT (torch's own attention kernels) sized like a given Vision Mamba."""

    def __init__(self, cfg: EncoderConfig, heads: int | None = None):
        super().__init__()
        heads = heads or max(1, cfg.dim // 32)
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.dim, cfg.grid)[None], persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.dim, heads, int(cfg.dim * cfg.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(x))


def train_step(model: nn.Module, images: torch.Tensor):
    """A closure running one training step (forward, backward, AdamW) of an encoder on `images`."""
    opt = adamw(model.parameters(), lr=1e-4)

    def step():
        out = model(images)
        tokens = out.tokens if hasattr(out, "tokens") else out
        loss = tokens.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def benchmark_encoder(sizes=(128, 256, 384, 512), batch: int = 8, repeats: int = 5, preset: str = "tiny",
                      out_json: str | Path | None = None, seed: int = 0, statistic: str = "median",
                      min_seconds: float = 2.0, warmup: int = 2) -> dict:
    """Training images/s of the preset's encoder (1-way, 4-way) and a same-sized ViT at each input size.

    The three encoders' steps are interleaved (one step of each per round), so that load from other
    processes falls on all three alike; each size runs at least `repeats` rounds and as many more as
    fit in `min_seconds` (up to 25), after `warmup` untimed steps of each. `statistic` is the step time
    reported: "median" of the rounds, or "min" (a step can be slowed by another process, not sped up).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', not {statistic!r}")
    base = get_preset(preset).encoder
    systems = ("mamba 1-way", "mamba 4-way", "vit")
    rows = []
    for size in tqdm(sizes, desc="encoder throughput", unit="size"):
        steps, params = {}, {}
        for name in systems:
            torch.manual_seed(seed)
            cfg = EncoderConfig(**{**base.to_dict(), "image_size": int(size),
                                   "scan": "4-way" if name == "mamba 4-way" else "1-way"})
            model = (ViTEncoder(cfg) if name == "vit" else VisionMamba(cfg)).train()
            params[name] = sum(p.numel() for p in model.parameters()) / 1e6
            steps[name] = train_step(model, torch.randn(batch, cfg.in_chans, size, size))
            for _ in range(warmup):                # allocations, kernel selection
                steps[name]()
        times = {name: [] for name in systems}
        started = time.perf_counter()
        while True:
            for name in systems:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
            rounds = len(times["vit"])
            if rounds >= repeats and (time.perf_counter() - started >= min_seconds or rounds >= 25):
                break
        for name in systems:
            seconds = statistics.median(times[name]) if statistic == "median" else min(times[name])
            rows.append({"system": name, "image_size": int(size), "tokens": cfg.num_patches, "batch": batch,
                         "step_s": seconds, "images_per_s": batch / seconds, "params_m": params[name],
                         "rounds": rounds})
            log.info("%s at %d px: %.1f images/s", name, size, batch / seconds)
    result = {"preset": preset, "dim": base.dim, "depth": base.depth, "patch_size": base.patch_size,
              "batch": batch, "repeats": repeats, "statistic": f"{statistic}, interleaved",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
              "rows": rows, "scaling": _scaling(rows)}
    if out_json is not None:
        write_json(Path(out_json), result)
    return result


def _scaling(rows: list[dict]) -> dict:
    """Slope of log(step time) against log(tokens) per system: 1 is linear, 2 quadratic."""
    out = {}
    for name in sorted({r["system"] for r in rows}):
        pts = [(r["tokens"], r["step_s"]) for r in rows if r["system"] == name]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[name] = float(np.polyfit(x, y, 1)[0])
    return out


def format_encoder_table(result: dict) -> str:
    """The benchmark as a fixed-width table with ratios against the ViT at each size."""
    rows = result["rows"]
    vit = {r["image_size"]: r["images_per_s"] for r in rows if r["system"] == "vit"}
    lines = [f"encoder training throughput (preset {result['preset']}: dim {result['dim']}, depth "
             f"{result['depth']}, patch {result['patch_size']}, batch {result['batch']}, "
             f"{result['threads']} threads, step time: {result.get('statistic', 'median')})",
             f"{'system':<13}{'px':>6}{'tokens':>8}{'images/s':>11}{'vs ViT':>9}{'params M':>10}"]
    for r in rows:
        ratio = r["images_per_s"] / vit[r["image_size"]] if r["image_size"] in vit else float("nan")
        lines.append(f"{r['system']:<13}{r['image_size']:>6}{r['tokens']:>8}{r['images_per_s']:>11.1f}"
                     f"{ratio:>8.2f}x{r['params_m']:>10.2f}")
    slopes = ", ".join(f"{k} {v:.2f}" for k, v in result["scaling"].items())
    lines.append(f"log-log slope of step time vs tokens (1 = linear, 2 = quadratic): {slopes}")
    return "\n".join(lines)
