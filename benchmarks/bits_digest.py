"""Which operation gives other bits on another CPU: a digest per operation of the Vision Mamba path and of a
torch-only stack, to run on two machines and diff (same commit, same torch, one thread).

    OMP_NUM_THREADS=1 python benchmarks/bits_digest.py > bits_$(hostname).txt    # ~1 minute with the build
    diff bits_machineA.txt bits_machineB.txt
    diff <(grep -v '^#' benchmarks/bits/amd_epyc_zen5_avx512.txt) <(grep -v '^#' bits_$(hostname).txt)

benchmarks/bits/ keeps the digests of the machines it has run on (one file each, the CPU in its first line), so
that a session on another CPU diffs against them without that machine.

Each line: an operation (forward, then its gradients), the sha256 of its float32 bytes (first 16 hex digits).
Inputs come from a fixed seed, computed once and digested too (torch's randn itself is vectorised per CPU
capability, so an `inputs` line that differs means the comparison is of other inputs). Operations:
  kernel/*  the compiled CPU kernels (models/ssm_build): scan, RMSNorm, SwiGLU gate, mixer conv
  torch/*   the torch ops the Mamba encoder calls: its conv stem (channels-last after the per-location norm:
            oneDNN's brgemm convolution, which the ResNet baselines' NCHW convolutions do not use), the same stem
            on NCHW inputs, the mixer's linear layers (x_proj's 40 outputs, dt_proj's K = 8) and a batched matmul
  encoder/* the tiny encoder at 64 px, batch 4: forward, every gradient, three AdamW steps (1-way, 4-way)
  baseline/* a torch-only conv + Transformer stack (what the rows that did not move run)
The header names the kernel's build flags, torch's CPU capability, oneDNN's ISA and the MKL version.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxpmrg_lib.models.fused_ops import RMSNorm, swiglu  # noqa: E402
from cxpmrg_lib.models.mixer_conv import causal_conv_silu  # noqa: E402
from cxpmrg_lib.models.ssm import selective_scan  # noqa: E402
from cxpmrg_lib.models.ssm_build import _build_name, build_flags, load_kernel  # noqa: E402
from cxpmrg_lib.models.vision_mamba import EncoderConfig, VisionMamba, conv_stem  # noqa: E402


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def line(name: str, *tensors: torch.Tensor) -> None:
    print(f"{name:32s} {digest(*tensors)}")


def fwd_bwd(name: str, fn, inputs: list[torch.Tensor], params: list[torch.Tensor] = ()) -> None:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    line(f"{name}/fwd", out)
    line(f"{name}/grad_inputs", *[t.grad for t in leaves])
    if params:
        line(f"{name}/grad_params", *[p.grad for p in params])


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def main() -> int:
    torch.set_num_threads(1)
    if load_kernel() is None:
        print("the compiled kernel did not build", file=sys.stderr)
        return 1
    print(f"# kernel {_build_name()}: {' '.join(build_flags())}")
    print(f"# torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, "
          f"MKL_CBWR={os.environ.get('MKL_CBWR', '-')}, threads {torch.get_num_threads()}")
    Bn, D, L, N = 4, 128, 16, 16
    u, dt, z, Bm, Cm = (randn(Bn, D, L, seed=1), randn(Bn, D, L, seed=2), randn(Bn, D, L, seed=3),
                        randn(Bn, N, L, seed=4), randn(Bn, N, L, seed=5))
    A = -torch.rand(D, N, generator=torch.Generator().manual_seed(6)) * 4 - 0.5
    Dd, db = randn(D, seed=8), randn(D, seed=9)
    line("inputs", u, dt, z, Bm, Cm, A, Dd, db)
    fwd_bwd("kernel/scan", lambda *a: selective_scan(*a[:7], delta_bias=a[7], delta_softplus=True, impl="compiled"),
            [u, dt, A, Bm, Cm, Dd, z, db])
    rn = RMSNorm(D)
    with torch.no_grad():
        rn.weight.copy_(1 + 0.5 * randn(D, seed=10))
    fwd_bwd("kernel/rmsnorm", rn, [randn(64, D, seed=11)], [rn.weight])
    fwd_bwd("kernel/swiglu", swiglu, [randn(64, 4 * D, seed=12), randn(4 * D, seed=13)])
    g = torch.arange(16)
    orders = torch.stack([g, g.flip(0), g.view(4, 4).t().reshape(-1), g.view(4, 4).t().reshape(-1).flip(0)])
    fwd_bwd("kernel/conv", lambda x, w, b: causal_conv_silu(x, w, b, orders),
            [randn(Bn, D, L, seed=14), randn(4, D, 4, seed=15), randn(4, D, seed=16)])

    torch.manual_seed(0)
    stem = conv_stem(1, D, 16)
    images = randn(Bn, 1, 64, 64, seed=17)
    fwd_bwd("torch/stem_channels_last", stem, [images], list(stem.parameters()))
    for p in stem.parameters():
        p.grad = None
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_pre_hook(lambda m, a: (a[0].contiguous(),)) for c in convs]
    fwd_bwd("torch/stem_nchw", stem, [images], list(stem.parameters()))
    for h in hooks:
        h.remove()
    for name, (k, n) in {"x_proj": (D, 8 + 2 * N), "dt_proj": (8, D), "in_proj": (D, 2 * D)}.items():
        lin = torch.nn.Linear(k, n, bias=name == "dt_proj")
        fwd_bwd(f"torch/linear_{name}", lin, [randn(Bn * L * 4, k, seed=18)], list(lin.parameters()))
    fwd_bwd("torch/bmm", torch.bmm, [randn(4, Bn * L, D, seed=19), randn(4, D, 40, seed=20)])

    for scan in ("1-way", "4-way"):
        torch.manual_seed(0)
        enc = VisionMamba(EncoderConfig(image_size=64, patch_size=16, dim=D, depth=8, stem="conv", scan=scan))
        weight = randn(Bn, 16, D, seed=21)
        out = enc(images).tokens
        (out * weight).sum().backward()
        line(f"encoder/{scan}/fwd", out)
        for name, p in enc.named_parameters():
            if name.startswith(("patch_embed", "blocks.0.", "norm")):
                line(f"encoder/{scan}/grad/{name}", p.grad)
        line(f"encoder/{scan}/grad/all", *[p.grad for p in enc.parameters()])
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
        opt.step()
        for _ in range(2):
            opt.zero_grad()
            (enc(images).tokens * weight).sum().backward()
            opt.step()
        line(f"encoder/{scan}/adamw3", *[p.detach() for p in enc.parameters()])

    torch.manual_seed(2)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 8, 8), torch.nn.GELU(), torch.nn.Flatten(2))
    layers = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True), 2)
    params = [*conv.parameters(), *layers.parameters()]
    fwd_bwd("baseline/conv_transformer", lambda x: layers(conv(x).transpose(1, 2)), [images], params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
