"""Speed and peak memory of the selective scan: sequential reference, mambapy, ours (pure PyTorch, compiled).

"pytorch" is ssm.py's pure-PyTorch path (impl="fast"), "compiled" its C++ kernel
(impl="compiled"; left out, with a log line, where it cannot be built). All run the same Mamba block configuration (D, z gating, delta_bias, softplus) on
the same float32 inputs, forward + backward of a fixed random projection of the output.
Timings are interleaved (one run of each implementation per round) so that load from
other processes hits all of them alike; the median over rounds is reported. Memory is the
high-water mark of CPU allocator events recorded by torch.profiler during one forward +
backward (see MEMORY_METHOD).
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from cxpmrg_lib.util.progress import tqdm

from cxpmrg_lib.util.fileio import write_json
from cxpmrg_lib.models.ssm import compiled_available, selective_scan

__all__ = ["benchmark_scan", "format_scan_table", "MAMBAPY_INSTALL", "MEMORY_METHOD", "OURS", "IMPL_ORDER"]

logger = logging.getLogger(__name__)

MAMBAPY_INSTALL = "python -m pip install mambapy==1.2.0 --no-deps"
MEMORY_METHOD = ("torch.profiler.profile(profile_memory=True) around one forward+backward: the CPU "
                 "allocator's alloc/free events in time order are summed and the peak of the running sum "
                 "is reported (bytes allocated on top of the pre-existing inputs; outputs, autograd "
                 "buffers, temporaries and input gradients count)")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# The sequential loops are 5-300x slower (the reference's backward grows as L^2, see
# ssm.selective_scan_reference): they get at most 3 timed rounds and none past 20 s.
SLOW = ("reference", "lean_loop")
SLOW_MAX_ROUNDS = 3
SLOW_BUDGET_S = 20.0
OURS = ("compiled", "pytorch")             # this project's two CPU paths, fastest first
IMPL_ORDER = ("reference", "lean_loop", "mambapy", "pytorch", "compiled")


def _mambapy_scan() -> Callable:
    """mambapy's parallel-scan selective scan wrapped into mamba_ssm's calling convention."""
    try:
        from mambapy.mamba import MambaBlock
    except ImportError as e:
        raise RuntimeError(f"benchmark_scan(include_mambapy=True) needs mambapy ({e}); install it with "
                           f"`{MAMBAPY_INSTALL}` or pass include_mambapy=False") from e

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        # mambapy takes (batch, length, channels) and a final delta; bias, softplus and the
        # z gate happen outside its scan, exactly as in its MambaBlock.ssm/forward.
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y = MambaBlock.selective_scan(None, u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                      C.transpose(1, 2), D if D is not None else torch.zeros_like(A[:, 0]))
        y = y.transpose(1, 2)
        return y * F.silu(z) if z is not None else y

    return scan


def _lean_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A leaner per-step loop than the reference (discretises inside the step, no einsum).

    Shown beside the reference because a "sequential loop with autograd" can be written
    several ways: the speed-up over "the reference" depends on which one is meant.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def _inputs(batch: int, channels: int, state: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs in the ranges of a trained Mamba block (A = -exp(A_log), dt ~ softplus(-4 .. 0))."""
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(batch, channels, length, generator=g),
            "delta": torch.randn(batch, channels, length, generator=g) - 2.0,
            "A": -torch.exp(torch.rand(channels, state, generator=g) * 3),
            "B": torch.randn(batch, state, length, generator=g),
            "C": torch.randn(batch, state, length, generator=g),
            "D": torch.randn(channels, generator=g),
            "z": torch.randn(batch, channels, length, generator=g),
            "delta_bias": torch.randn(channels, generator=g) * 0.5}


def _step(fn: Callable, inputs: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """One forward + backward; gradients are dropped first so every step allocates them afresh."""
    for t in inputs.values():
        t.grad = None
    out = fn(*(inputs[k] for k in NAMES[:5]), D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"],
             delta_softplus=True)
    (out * weight).sum().backward()
    return out.detach()


def _peak_bytes(run: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def benchmark_scan(lengths=(64, 196, 784), batch: int = 8, channels: int = 192, state: int = 16,
                   repeats: int = 7, include_mambapy: bool = True, include_compiled: bool = True,
                   out_json: Path | None = None) -> dict:
    """Forward+backward median time and peak memory of reference, lean loop, mambapy and ours.

    Each implementation's first run is profiled for memory and its output and input
    gradients are compared with the reference's (max relative error, "check_vs_reference").
    Uses the current torch.get_num_threads(); changes no global setting.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    impls: dict[str, Callable] = {"reference": lambda *a, **k: selective_scan(*a, **k, impl="reference"),
                                  "lean_loop": _lean_loop}
    if include_mambapy:
        impls["mambapy"] = _mambapy_scan()
    impls["pytorch"] = lambda *a, **k: selective_scan(*a, **k, impl="fast")
    if include_compiled and compiled_available():
        impls["compiled"] = lambda *a, **k: selective_scan(*a, **k, impl="compiled")
    elif include_compiled:
        logger.warning("the compiled scan is not available here (see the log line above): it is left out")
    result = {"config": {"batch": batch, "channels": channels, "state": state, "dtype": "float32",
                         "repeats": repeats, "slow_impls": list(SLOW), "slow_max_rounds": SLOW_MAX_ROUNDS,
                         "slow_budget_s": SLOW_BUDGET_S, "warmup": "1 run (the profiled, checked one)", "loss": "(out * fixed_random_weight).sum()",
                         "block": "D, z gate, delta_bias, delta_softplus=True"},
              "environment": {"torch": torch.__version__, "num_threads": torch.get_num_threads(),
                              "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                              "mambapy": _version("mambapy") if include_mambapy else None,
                              "compiled": "compiled" in impls, "loadavg_start": _loadavg()},
              "time_method": "time.perf_counter around forward+backward; impls interleaved per round; median",
              "memory_method": MEMORY_METHOD, "lengths": {}}
    bar = tqdm(total=len(lengths) * len(impls), desc="selective scan benchmark")
    for length in lengths:
        inputs = {k: v.requires_grad_() for k, v in _inputs(batch, channels, state, length, seed=length).items()}
        weight = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(length + 1))
        entry: dict = {"time_s": {}, "times_s": {}, "peak_mem_bytes": {}, "check_vs_reference": {}}
        ref_out = ref_grads = None
        for name, fn in impls.items():
            # first run: warm-up, memory profile and check against the reference at once
            outcome = {}
            entry["peak_mem_bytes"][name] = _peak_bytes(lambda: outcome.update(out=_step(fn, inputs, weight)))
            grads = {k: inputs[k].grad.clone() for k in NAMES}
            if name == "reference":
                ref_out, ref_grads = outcome["out"], grads
            else:
                entry["check_vs_reference"][name] = {
                    "output_max_rel_err": _max_rel_err(outcome["out"], ref_out),
                    "grad_max_rel_err": max(_max_rel_err(grads[k], ref_grads[k]) for k in NAMES)}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(repeats):
            for name, fn in impls.items():
                if name in SLOW and (r >= SLOW_MAX_ROUNDS or sum(times[name]) > SLOW_BUDGET_S):
                    continue
                t0 = time.perf_counter()
                _step(fn, inputs, weight)
                times[name].append(time.perf_counter() - t0)
        for name in impls:
            entry["times_s"][name] = times[name]
            entry["time_s"][name] = sorted(times[name])[len(times[name]) // 2]
            bar.update()
        t, m = entry["time_s"], entry["peak_mem_bytes"]
        ratios = {}
        for ours in (o for o in OURS if o in t):
            for other in (n for n in IMPL_ORDER if n in t and n != ours and not (ours == "pytorch" and n == "compiled")):
                ratios[f"{other}_time/{ours}"] = t[other] / t[ours]
                ratios[f"{ours}_mem/{other}_mem"] = m[ours] / m[other]
        entry["ratios"] = ratios
        result["lengths"][str(length)] = entry
        logger.info("scan L=%d: %s", length, {k: f"{v * 1e3:.1f} ms" for k, v in t.items()})
    bar.close()
    result["environment"]["loadavg_end"] = _loadavg()
    if out_json is not None:
        write_json(out_json, result)
    return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    """1/5/15-minute load: a busy machine explains noisy timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_scan_table(result: dict) -> str:
    """Plain-text table: one row per length, times in ms, peak memory in MiB, ratios of ours to the others."""
    first = next(iter(result["lengths"].values()))
    impls = [n for n in IMPL_ORDER if n in first["time_s"]]
    ours = [o for o in OURS if o in impls]
    pairs = [(o, n) for o in ours for n in impls if n != o and not (o == "pytorch" and n == "compiled")]
    head = (["L"] + [f"{n} ms" for n in impls] + [f"{n} MiB" for n in impls]
            + [f"{n}/{o} time" for o, n in pairs] + [f"{o}/{n} mem" for o, n in pairs if n in ("pytorch", "mambapy")])
    rows = []
    for length, e in result["lengths"].items():
        r = e["ratios"]
        row = ([length] + [f"{e['time_s'][n] * 1e3:.1f}" for n in impls]
               + [f"{e['peak_mem_bytes'][n] / 2**20:.1f}" for n in impls]
               + [f"{r[f'{n}_time/{o}']:.2f}x" for o, n in pairs]
               + [f"{r[f'{o}_mem/{n}_mem']:.3f}" for o, n in pairs if n in ("pytorch", "mambapy")])
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    cfg, env = result["config"], result["environment"]
    lines.append(f"(batch={cfg['batch']}, channels={cfg['channels']}, state={cfg['state']}, {cfg['dtype']}, "
                 f"{env['num_threads']} threads, torch {env['torch']}, mambapy {env.get('mambapy')}, "
                 f"load {env.get('loadavg_start')} -> {env.get('loadavg_end')})")
    return "\n".join(lines)
