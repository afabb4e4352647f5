"""The study's GPU check: one prepared command that exercises every CUDA path of the library.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--work DIR]   # on a GPU: about 5-8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny              # dry run of every section: about a minute

Sections (each reported as ok / failed / skipped, with the reason):
  parity   the selective scan's Triton kernels, the pure-PyTorch path (impl="fast") and mamba-ssm (when it
           imports) against the sequential reference: fp32 and bf16, forward, last state and gradients
  scan     forward + backward times (and peak CUDA memory) of each scan at B8 D768 N16, L = 196, 784, 3136
  steps    one training step of each stage at the `base` preset under bf16 autocast, with step time and peak
           memory: stage 1 (ARM), stage 2 (contrastive, 4-way encoder + BERT text encoder), stage 3 (4-way
           encoder + visual prefix + a frozen LM of Llama-2-7B's shape, or a smaller one that fits)
  stage3   the tiny preset on a phantom through the library's stages: stage 1, 2 and the report LM on the CPU,
           then stage 3 from them once on the CPU and once on --device (bf16 autocast in the trainer on CUDA);
           the device run's test metrics must fall within the CPU run's bootstrap 95% CIs

Writes DIR/gpu_check.json and DIR/gpu_check.md (and prints the markdown); exits 1 when a section failed.
The dry run (--device cpu --tiny) runs every section at tiny sizes; the Triton kernels then run in Triton's
CPU interpreter (TRITON_INTERPRET=1 is set here, before triton is imported) when triton is installed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:        # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

SECTIONS = ("parity", "scan", "steps", "stage3")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = {"float32": 1e-3, "bfloat16": 5e-2}      # max |error| / max |reference|
REPORT_WORDS = ["heart size is normal", "the lungs are clear", "no pleural effusion", "no pneumothorax",
                "mild cardiomegaly", "small left pleural effusion", "patchy opacity in the right lower lobe",
                "pulmonary vascular congestion", "degenerative changes of the spine", "no acute osseous abnormality",
                "a support device is in place", "the mediastinal contour is stable"]


def _reports(n: int) -> list[str]:
    """Deterministic made-up reports (the tokenizers and text inputs of the training steps)."""
    words = REPORT_WORDS
    return [". ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7)).capitalize() + "." for i in range(n)]


# ----------------------------------------------------------------------------- helpers

class Context:
    def __init__(self, args):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.t_start = time.perf_counter()
        self.scan_log: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        import torch

        if not self.cuda:
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)


class _ScanLog(logging.Handler):
    """Collects the scan path messages of cxpmrg_lib.models.ssm (which scan the models used)."""

    def __init__(self, sink: list):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())


def _triton_scan():
    """(selective_scan_triton, None) or (None, why not)."""
    try:
        from cxpmrg_lib.models.ssm_triton import interpreter_active, selective_scan_triton
    except ImportError as e:
        return None, f"triton does not import ({e})"
    return selective_scan_triton, ("interpreter" if interpreter_active() else None)


def _mamba_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 - an import that fails for any reason means "not available"
        return None, f"mamba_ssm does not import ({type(e).__name__}: {e})"
    return selective_scan_fn, None


def _scan_impls(ctx, per_seq: bool) -> dict:
    """name -> callable with selective_scan_fn's signature, or a str saying why it is not run."""
    from cxpmrg_lib.models.ssm import selective_scan

    impls = {"fast": lambda *a, **k: selective_scan(*a, **k, impl="fast")}
    tri, why = _triton_scan()
    if tri is None:
        impls["triton"] = why
    elif ctx.cuda or why == "interpreter":
        impls["triton"] = tri
    else:
        impls["triton"] = "CPU tensors and no TRITON_INTERPRET=1: the kernels need CUDA or the interpreter"
    mamba, why = _mamba_scan()
    if mamba is None:
        impls["mamba-ssm"] = why
    elif not ctx.cuda:
        impls["mamba-ssm"] = "mamba-ssm's kernel runs on CUDA only"
    elif per_seq:
        impls["mamba-ssm"] = "mamba-ssm takes one A for all sequences"
    else:
        impls["mamba-ssm"] = mamba
    return impls


def _scan_inputs(batch, channels, state, length, per_seq, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    vec = (batch, channels) if per_seq else (channels,)
    a_shape = (batch, channels, state) if per_seq else (channels, state)
    t = {"u": r(batch, channels, length), "delta": r(batch, channels, length) * 0.5,
         "A": -torch.exp(torch.rand(*a_shape, generator=g, dtype=torch.float64) * 2),
         "B": r(batch, state, length), "C": r(batch, state, length), "D": r(*vec),
         "z": r(batch, channels, length), "delta_bias": r(*vec) * 0.3}
    return {k: v.to(device) for k, v in t.items()}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _fwd_bwd(fn, inputs, weight, last_state=False):
    """out (and last state) and input grads of sum(out * weight)."""
    import torch

    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kw = dict(D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    if last_state:
        kw["return_last_state"] = True
    res = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **kw)
    out, last = res if last_state else (res, None)
    (out.double() * weight).sum().backward()
    return out.detach(), last, {k: v.grad for k, v in leaves.items()}, torch.is_tensor(out) and out.dtype


def _final_state(inputs):
    """The state after the last step, by the recurrence written out (float64)."""
    import torch
    import torch.nn.functional as F

    u, delta, A, B = (inputs[k].double() for k in ("u", "delta", "A", "B"))
    dt = F.softplus(delta + inputs["delta_bias"].double()[..., None])
    A = A.expand(u.shape[0], -1, -1)
    h = torch.zeros(*A.shape, dtype=torch.float64, device=u.device)
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
    return h


# ----------------------------------------------------------------------------- (a) parity

def section_parity(ctx) -> dict:
    import torch

    from cxpmrg_lib.models.ssm import selective_scan_reference

    b, d, n, L = (2, 8, 4, 70) if ctx.tiny else (2, 64, 16, 300)
    rows, failed = [], False
    for per_seq in (False, True):
        base = _scan_inputs(b, d, n, L, per_seq, ctx.device, seed=1 + per_seq)
        weight = torch.randn(b, d, L, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(ctx.device)
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).replace("torch.", "")
            # activations in the dtype, parameters (A, D, delta_bias) in fp32 as under autocast (mamba-ssm needs that)
            inputs = {k: v.to(dtype if k in ("u", "delta", "B", "C", "z") else torch.float32) for k, v in base.items()}
            # the reference in float64 for fp32 inputs; for bf16 inputs it computes in fp32, like the kernels
            ref_in = {k: v.double() for k, v in inputs.items()} if dtype == torch.float32 else inputs
            ref_out, _, ref_grads, _ = _fwd_bwd(selective_scan_reference, ref_in, weight)
            for name, fn in _scan_impls(ctx, per_seq).items():
                row = {"A": "per-sequence" if per_seq else "shared", "dtype": dname, "impl": name}
                if isinstance(fn, str):
                    rows.append({**row, "status": "skipped", "why": fn})
                    continue
                try:
                    with_last = name in ("triton", "mamba-ssm", "fast")
                    out, last, grads, out_dtype = _fwd_bwd(fn, inputs, weight, last_state=with_last)
                except Exception as e:  # noqa: BLE001 - one implementation failing is a result, not a crash
                    failed = True
                    rows.append({**row, "status": "failed", "why": f"{type(e).__name__}: {e}"[:300]})
                    continue
                row["forward"] = _rel(out, ref_out)
                row["grad_max"] = max(_rel(grads[k], ref_grads[k]) for k in NAMES)
                row["grad_worst"] = max(NAMES, key=lambda k: _rel(grads[k], ref_grads[k]))
                if last is not None:
                    row["last_state"] = _rel(last, _final_state(inputs))
                errs = [row["forward"], row["grad_max"], row.get("last_state", 0.0)]
                ok = all(math.isfinite(e) and e < TOL[dname] for e in errs) and out_dtype == dtype
                row["status"] = "ok" if ok else "failed"
                failed |= not ok
                rows.append(row)
    return {"status": "failed" if failed else "ok", "shape": {"batch": b, "channels": d, "state": n, "length": L},
            "tolerance": TOL, "rows": rows,
            "note": "errors are max |impl - reference| / max |reference| (forward, final state, worst input gradient)"}


# ----------------------------------------------------------------------------- (b) scan times

def section_scan(ctx) -> dict:
    import torch

    if ctx.tiny:
        b, d, n, lengths, repeats = 1, 16, 4, (16, 32), 1
    else:
        b, d, n, lengths, repeats = 8, 768, 16, (196, 784, 3136), 5
    rows = []
    impls = _scan_impls(ctx, per_seq=False)
    if not ctx.cuda and callable(impls.get("triton")):
        impls["triton (interpreter)"] = impls.pop("triton")     # a CPU interpreter's times mean nothing
    for L in lengths:
        inputs = _scan_inputs(b, d, n, L, False, ctx.device, seed=L)
        inputs = {k: v.float() for k, v in inputs.items()}
        weight = torch.randn(b, d, L, device=ctx.device)
        for name, fn in impls.items():
            row = {"length": L, "impl": name}
            if isinstance(fn, str):
                rows.append({**row, "status": "skipped", "why": fn})
                continue
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

            def step():
                out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                         z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
                (out * weight).sum().backward()

            try:
                ctx.sync()
                t0 = time.perf_counter()
                step()                      # warm-up (Triton compiles here)
                ctx.sync()
                first = time.perf_counter() - t0
                ctx.reset_peak()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    ctx.sync()
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": "failed", "why": f"{type(e).__name__}: {e}"[:300]})
                continue
            rows.append({**row, "status": "ok", "fwd_bwd_ms": round(1e3 * statistics.median(times), 3),
                         "first_call_s": round(first, 3), "peak_gib": ctx.peak_gib()})
    failed = any(r["status"] == "failed" for r in rows)
    return {"status": "failed" if failed else "ok", "shape": {"batch": b, "channels": d, "state": n},
            "repeats": repeats, "rows": rows,
            "note": "fp32 inputs with D, z, delta_bias, softplus; median of the timed repeats after one warm-up "
                    "call; peak = CUDA high-water mark during the timed repeats"}


# ----------------------------------------------------------------------------- (c) training steps

def _time_step(ctx, model, loss_fn, steps: int) -> dict:
    """One warm-up step, then `steps` timed ones: AdamW on the trainable parameters, bf16 autocast."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = step()
    ctx.reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return {"step_s": round(statistics.median(times), 4), "peak_gib": ctx.peak_gib(), "loss": round(loss, 4),
            "finite": math.isfinite(loss), "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _lm_shape(ctx) -> tuple[str, dict]:
    """The frozen LM of stage 3: Llama-2-7B's shape where it fits, else a smaller Llama."""
    import torch

    if ctx.tiny:
        return "tiny (preset)", {}
    seven_b = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                   intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
    small = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=5504, vocab_size=32000, max_position_embeddings=4096)
    choice = ctx.args.lm
    if choice == "auto":
        total = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.cuda else 0
        choice = "7b" if total >= 40 * 2 ** 30 else "small"
    return ("Llama-2-7B shape" if choice == "7b" else "Llama 1.3B shape"), (seven_b if choice == "7b" else small)


def section_steps(ctx) -> dict:
    import torch

    from cxpmrg_lib.models.arm import ARMPretrainer
    from cxpmrg_lib.models.contrastive import ContrastiveModel
    from cxpmrg_lib.models.report_generator import ReportModel
    from cxpmrg_lib.models.report_lm import VisualPrefixLM, build_report_lm, train_bpe_tokenizer
    from cxpmrg_lib.models.text_encoder import TextEncoder
    from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba
    from cxpmrg_lib.presets import get_preset

    preset = get_preset("tiny" if ctx.tiny else "base")
    b1, b2, b3 = (2, 2, 2) if ctx.tiny else ctx.args.base_batches
    steps = 1 if ctx.tiny else 2
    size = preset.encoder.image_size
    dev = ctx.device
    g = torch.Generator().manual_seed(0)
    rows = []

    def run(name, build, batch):
        row = {"stage": name, "batch": batch}
        model = None
        try:
            torch.manual_seed(0)
            model, loss_fn, extra = build(batch)
            row.update(extra)
            row.update(_time_step(ctx, model, loss_fn, steps))
            row["status"] = "ok" if row["finite"] else "failed"
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", why=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-2000:])
        finally:
            del model
            if ctx.cuda:
                torch.cuda.empty_cache()
        rows.append(row)

    def stage1(batch):
        model = ARMPretrainer(preset.arm).to(dev)
        images = torch.rand(batch, 1, size, size, generator=g).to(dev)
        return model, lambda: model(images)["loss"], {"model": f"ARM, encoder {preset.encoder.dim}x{preset.encoder.depth}"}

    def four_way():
        return VisionMamba(EncoderConfig(**{**preset.encoder.to_dict(), "scan": "4-way"}))

    def stage2(batch):
        text = TextEncoder.build(preset.text, texts=_reports(200), vocab_size=2000)
        model = ContrastiveModel(four_way(), text, preset.proj_dim).to(dev)
        images = torch.rand(batch, 2, 1, size, size, generator=g).to(dev)
        mask = torch.ones(batch, 2, dtype=torch.bool, device=dev)
        mask[::2, 1] = False                                   # every other study has one view
        tok = text.tokenize(_reports(batch), device=dev)
        return model, lambda: model(images, tok["input_ids"], tok["attention_mask"], image_mask=mask)["loss"], \
            {"model": f"4-way encoder + text {preset.text.hidden}x{preset.text.layers}, proj {preset.proj_dim}"}

    def stage3(batch):
        from transformers import LlamaConfig, LlamaForCausalLM

        label, shape = _lm_shape(ctx)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_bpe_tokenizer(_reports(200), Path(tmp) / "bpe", vocab_size=600, min_frequency=1)
        if shape:
            cfg = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
            old = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)     # built in bf16 on the device: a frozen 7B LM in 13 GB
            try:
                with torch.device(dev):
                    lm = LlamaForCausalLM(cfg)
            finally:
                torch.set_default_dtype(old)
        else:
            lm = build_report_lm(preset.report_lm, tokenizer)
        encoder = four_way()
        head = VisualPrefixLM(lm, tokenizer, encoder.config.dim, max_report_tokens=128)
        model = ReportModel(encoder, head).to(dev)
        model.train()
        images = torch.rand(batch, 2, 1, size, size, generator=g).to(dev)
        mask = torch.ones(batch, 2, dtype=torch.bool, device=dev)
        reports = _reports(batch)
        return model, lambda: model(images, mask, reports)["loss"], {"model": f"4-way encoder + frozen LM ({label})"}

    run("stage 1 (ARM)", stage1, b1)
    run("stage 2 (contrastive)", stage2, b2)
    run("stage 3 (frozen LM)", stage3, b3)
    failed = any(r["status"] == "failed" for r in rows)
    return {"status": "failed" if failed else "ok", "preset": preset.name, "steps_timed": steps, "rows": rows,
            "note": "bf16 autocast, AdamW on the trainable parameters; median step time after one warm-up step; "
                    "peak = CUDA high-water mark over the timed steps (weights and optimizer state included)"}


# ----------------------------------------------------------------------------- (d) stage 3 on the phantom

def section_stage3(ctx) -> dict:
    from cxpmrg_lib.data.phantom import write_phantom
    from cxpmrg_lib.stages import read_summary
    from cxpmrg_lib.stages.report import FinetuneConfig, finetune_report

    work = Path(ctx.args.work) if ctx.args.work else ctx.out / "stage3_work"
    if ctx.tiny:
        studies, px = 60, 64          # about 40 training studies: one full batch of the earlier stages (32)
        budget = dict(earlier_epochs=0.1, max_steps=2, batch_size=4, val_studies=2, test_studies=4, num_beams=1)
    else:
        studies, px = 600, 128
        budget = dict(earlier_epochs=1.0, epochs=1.0, val_studies=16, test_studies=150, num_beams=3)
    root = work / f"phantom_{studies}_{px}"
    if not (root / "df_chexpert_plus_240401.csv").exists():
        write_phantom(root, studies=studies, size=px, seed=0, overwrite=True)
    import torch

    from cxpmrg_lib.stages.report import prerequisites

    runs = {}
    cpu_root = work / "runs_cpu"
    dev_root = work / ("runs_" + str(ctx.device).replace(":", "") if ctx.cuda else "runs_cpu_again")
    common = dict(dataset_root=str(root), preset="tiny", **budget)
    t0 = time.perf_counter()
    for call in prerequisites(FinetuneConfig(**common, run_root=str(cpu_root), device="cpu")):
        call()                                   # stage 1, stage 2, the report LM: once, on the CPU
    runs["earlier stages (cpu)"] = {"wall_s": round(time.perf_counter() - t0, 2)}
    # stage 3 on each device starts from the very same stage 2 and report LM (copied), and from the same RNG state
    # (the head is initialised from the global generator), so only stage 3's device differs
    shutil.rmtree(dev_root, ignore_errors=True)
    shutil.copytree(cpu_root, dev_root, ignore=shutil.ignore_patterns("finetune"))
    for device, label, run_root in (("cpu", "cpu", cpu_root),
                                    (str(ctx.device), str(ctx.device) if ctx.cuda else "cpu (again)", dev_root)):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        run_dir = finetune_report(FinetuneConfig(**common, run_root=str(run_root), device=device))
        summary = read_summary(run_dir)
        runs[label] = {"wall_s": round(time.perf_counter() - t0, 2), "steps": summary["steps"],
                       "metrics": summary["test_metrics"], "ci": summary.get("test_ci") or {},
                       "test_studies": summary.get("test_studies"), "run_dir": str(run_dir)}
    cpu, other = runs["cpu"], runs[[k for k in runs if k not in ("cpu", "earlier stages (cpu)")][0]]
    rows, failed = [], False
    for metric in ("bleu4", "rouge_l", "meteor", "cider", "ce_f1", "ce_precision", "ce_recall"):
        if metric not in cpu["metrics"] or metric not in other["metrics"]:
            continue
        ci = cpu["ci"].get(metric)
        value = other["metrics"][metric]
        within = ci is not None and ci[0] - 1e-9 <= value <= ci[1] + 1e-9
        failed |= ci is not None and not within
        rows.append({"metric": metric, "cpu": round(cpu["metrics"][metric], 4),
                     "cpu_ci95": [round(c, 4) for c in ci] if ci else None,
                     "device": round(value, 4), "within_ci": within if ci else None})
    return {"status": "failed" if failed else "ok", "phantom": {"studies": studies, "px": px}, "budget": budget,
            "runs": runs, "rows": rows,
            "note": "tiny preset: stage 1, stage 2 and the report LM trained once on the CPU, then stage 3 on the "
                    "CPU and on the device from them (each in its own run folder); CIs are the CPU run's bootstrap "
                    "95% CIs over the test studies"}


# ----------------------------------------------------------------------------- report

def _environment(ctx) -> dict:
    import importlib.metadata

    import torch

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": version("triton"), "mamba_ssm": version("mamba-ssm"), "transformers": version("transformers"),
           "device": str(ctx.device), "tiny": ctx.tiny,
           "triton_interpret": os.environ.get("TRITON_INTERPRET"), "host": platform.node()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported())
    return env


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "" if v is None else str(v)


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


COLUMNS = {
    "parity": ["A", "dtype", "impl", "status", "forward", "last_state", "grad_max", "grad_worst", "why"],
    "scan": ["length", "impl", "status", "fwd_bwd_ms", "first_call_s", "peak_gib", "why"],
    "steps": ["stage", "model", "batch", "status", "step_s", "peak_gib", "loss", "trainable_M", "params_M", "why"],
    "stage3": ["metric", "cpu", "cpu_ci95", "device", "within_ci"],
}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    head = f"# GPU check ({env['device']}{', tiny dry run' if env['tiny'] else ''})\n\n"
    head += ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k not in ("device", "tiny")) + "\n"
    parts = [head]
    for name in SECTIONS:
        sec = result["sections"].get(name)
        if sec is None:
            continue
        parts.append(f"## {name}: {sec['status']} ({sec.get('seconds', 0):.1f} s)\n")
        if sec.get("why"):
            parts.append(f"{sec['why']}\n")
        if sec.get("rows"):
            cols = [c for c in COLUMNS[name] if any(c in r for r in sec["rows"])]
            parts.append(_table(sec["rows"], cols) + "\n")
        if name == "stage3" and sec.get("runs"):
            parts.append(_table([{"run": k, **v} for k, v in sec["runs"].items()],
                                ["run", "steps", "test_studies", "wall_s"]) + "\n")
        if sec.get("note"):
            parts.append(f"_{sec['note']}_\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny: the dry run)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for gpu_check.json/.md")
    p.add_argument("--work", default=None, help="folder for the stage3 section's phantom and runs (default: "
                                                 "OUT/stage3_work); reused by a later call")
    p.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (the CPU dry run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--lm", choices=("auto", "7b", "small"), default="auto",
                   help="stage 3's frozen LM in the steps section: Llama-2-7B's shape, a 1.3B one, or auto (7B "
                        "when the GPU has 40 GB or more)")
    p.add_argument("--base-batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 32, 8),
                   help="batch sizes of the stage 1,2,3 steps at the base preset (the preset trains stage 1 at "
                        "256 and stage 2 at 128, by accumulation where one step does not fit)")
    p.add_argument("--budget-s", type=float, default=460.0,
                   help="sections not started by then are skipped (the whole check must end within 8 minutes)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.device.startswith("cpu"):
        if not args.tiny:
            p.error("--device cpu is the dry run: add --tiny (the full sizes are for a GPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is first imported

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                "(the dry run is --device cpu --tiny)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = Context(args)
    scan_logger = logging.getLogger("cxpmrg_lib.models.ssm")
    scan_logger.setLevel(logging.INFO)
    scan_logger.addHandler(_ScanLog(ctx.scan_log))
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": _environment(ctx), "sections": {}}
    funcs = {"parity": section_parity, "scan": section_scan, "steps": section_steps, "stage3": section_stage3}
    for name in SECTIONS:
        if name not in sections:
            continue
        if ctx.elapsed() > args.budget_s:
            result["sections"][name] = {"status": "skipped", "why": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        print(f"[gpu_check] {name} ... ({ctx.elapsed():.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            sec = funcs[name](ctx)
        except ModuleNotFoundError as e:    # a machine with torch (and triton) only still runs parity and scan
            sec = {"status": "skipped", "why": f"needs the project's dependencies ({e}): pip install -e '.[cuda]'"}
        except Exception as e:  # noqa: BLE001 - a crashed section is reported and the others still run
            sec = {"status": "failed", "why": f"{type(e).__name__}: {e}"[:1000], "trace": traceback.format_exc()[-4000:]}
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        result["sections"][name] = sec
        print(f"[gpu_check] {name}: {sec['status']} in {sec['seconds']:.1f} s", flush=True)
    result["scan_paths_used"] = sorted(set(ctx.scan_log))
    result["total_s"] = round(ctx.elapsed(), 2)
    (ctx.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    md = to_markdown(result) + f"\nScan paths used by the models: {'; '.join(result['scan_paths_used']) or 'none'}. " \
        f"Total {result['total_s']:.0f} s.\n"
    (ctx.out / "gpu_check.md").write_text(md)
    print(md)
    return 1 if any(s["status"] == "failed" for s in result["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
