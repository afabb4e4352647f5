"""The MambaXray-VL visual encoder: patches -> Vision Mamba blocks -> tokens and a pooled vector.

Blocks are RMSNorm -> Mamba mixer -> residual, RMSNorm -> SwiGLU MLP -> residual (on a CPU the norms and
the gate are compiled ops where the compiled scan is: `fused_ops`).
The mixer's parameters carry mamba_ssm's `Mamba` names (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj) so one state dict serves the CPU scan and the CUDA
kernel. Stage 1 scans one way (a causal sequence, which the autoregressive head
needs); stages 2-3 scan four ways (rows forward/backward, columns forward/backward)
with the extra directions' weights copied from the 1-way ones (`expand_to_four_way`).

`EncoderConfig(arch="released")` builds instead the encoder of the released MambaXray-VL code (its
`models_mamba.py`, `mamba_simple.py` with `bimamba_type="v3"`, `models_pretrain.py`), whose weights
`models.released` loads: LayerNorm (with bias) for norm1, norm2 and the final norm; a SwiGLU MLP of
three biased linears w1, w2, w3, hidden dim*4*2//3; RGB input; 4-way: a class token in the middle of
the sequence (index M//2), a learned position embedding over the 1+M tokens, and directions named with
the released suffixes "", "_b", "_c", "_c_b" (A named A_log, A_b_log, A_c_log, A_c_b_log) whose column
scans hold token L//2 (the class token) in place and transpose the other tokens' grid; 1-way (the
released stage 1): no class token and a fixed sin-cos position embedding, kept as a frozen parameter
as the released code keeps it. The mixer, its scan paths and their dispatch are the study's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from cxpmrg_lib.models import mixer_conv
from cxpmrg_lib.models.fused_ops import RMSNorm, compiled_cpu, fused_applies, swiglu
from cxpmrg_lib.models.mixer_merged import merged_mixer_core, per_sequence, seq_major
from cxpmrg_lib.models.ssm import selective_scan, selective_scan_compiled

__all__ = ["EncoderConfig", "VisionMamba", "MambaMixer", "EncoderOutput", "expand_to_four_way",
           "sincos_pos_embed_2d", "study_tokens", "match_channels", "DIRECTIONS", "DIRECTION_PARAMS",
           "RELEASED_DIRECTIONS", "ARCHS"]

# Suffix of each scan direction's private parameters; "" is the 1-way direction (mamba_ssm names).
DIRECTIONS = {"1-way": ("",), "4-way": ("", "_b", "_col", "_col_b")}
# Parameters each direction owns (in_proj and out_proj are shared by all directions).
DIRECTION_PARAMS = ("conv1d", "x_proj", "dt_proj", "A_log", "D")
# The released code's suffixes (bimamba_type "v3"): rows forward, rows backward, columns forward, backward.
RELEASED_DIRECTIONS = {"1-way": ("",), "4-way": ("", "_b", "_c", "_c_b")}
STEMS = ("patch", "conv")
# "study": this project's encoder; "released": the released MambaXray-VL code's (module docstring).
ARCHS = ("study", "released")
# Fields added after run hashes existed, with the value every older config had: `to_dict` leaves a field out
# while it holds that value, so no existing payload (and no run hash) changes.
_ADDED_FIELDS = {"arch": "study", "mlp_hidden": None}


@dataclass
class EncoderConfig:
    image_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    dim: int = 128
    depth: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    mlp_ratio: float = 4.0
    scan: str = "1-way"
    dt_rank: int | None = None       # None: ceil(dim / 16), as in mamba_ssm
    norm_eps: float = 1e-5
    # "patch": one patch-size linear projection (Vision Mamba's, the paper's); "conv": a stack of
    # non-overlapping convolutions (4x4, then 2x2 until one patch) with a per-location norm, whose
    # tokens still each see exactly one patch, so stage 1's next-patch prediction stays leak-free.
    stem: str = "patch"
    arch: str = "study"
    mlp_hidden: int | None = None    # None: the arch's rule (study: ~dim*mlp_ratio*2/3 rounded to 8; released: //3)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.arch == "released" and self.stem != "patch":
            raise ValueError("the released encoder embeds patches with one linear projection (stem='patch')")
        if self.scan not in DIRECTIONS:
            raise ValueError(f"scan must be one of {sorted(DIRECTIONS)}, not {self.scan!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, not {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 4 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"the conv stem needs a power-of-two patch_size of at least 4, not {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def directions(self) -> tuple[str, ...]:
        """The scan directions' parameter suffixes."""
        return (RELEASED_DIRECTIONS if self.arch == "released" else DIRECTIONS)[self.scan]

    @property
    def class_token(self) -> bool:
        """Whether a class token sits in the middle of the sequence (the released 4-way encoder)."""
        return self.arch == "released" and self.scan == "4-way"

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden is not None:
            return int(self.mlp_hidden)
        if self.arch == "released":
            return int(self.dim * self.mlp_ratio) * 2 // 3
        return int(round(self.dim * self.mlp_ratio * 2 / 3 / 8)) * 8

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, old in _ADDED_FIELDS.items():
            if d[key] == old:
                del d[key]
        return d


@dataclass
class EncoderOutput:
    tokens: torch.Tensor                      # (B, L, dim), after the final norm
    pooled: torch.Tensor                      # (B, dim), mean over tokens
    layers: list[torch.Tensor] = field(default_factory=list)  # hidden states after the requested blocks


def sincos_pos_embed_2d(dim: int, grid: int, columns_first: bool = False) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (grid*grid, dim), row-major like the patches: the first half
    of the channels encodes the row, the second the column (`columns_first`: the other way round, the
    layout of the released code's MAE-style embedding)."""
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for a 2D sin-cos embedding")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    halves = [embed(cols), embed(rows)] if columns_first else [embed(rows), embed(cols)]
    return torch.cat(halves, dim=1).float()


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, channels, H, W): grey repeated for RGB, RGB averaged for grey."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"encoder takes {channels} channels, got {images.shape[1]}")


def _stack_directions(ts: list[torch.Tensor]) -> torch.Tensor:
    """The directions' tensors stacked on a new first dim (one direction: a view)."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


class MambaMixer(nn.Module):
    """A Mamba-1 mixer over a token sequence, with one private parameter set per scan direction."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 dt_rank: int | None = None, directions: Sequence[str] = ("",), grid: int | None = None,
                 hold_middle: bool = False):
        """`hold_middle`: the released layout: the sequence is the grid's tokens with one more at L//2 (the
        class token), which the column scans keep in place; A is named A{suffix}_log as there."""
        super().__init__()
        self.hold_middle = hold_middle
        self.d_inner = expand * dim
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.directions = tuple(directions)
        self.grid = grid
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        for suffix in self.directions:
            self._add_direction(suffix)

    def _add_direction(self, suffix: str) -> None:
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        conv = nn.Conv1d(d, d, self.d_conv, groups=d, padding=self.d_conv - 1, bias=True)
        x_proj = nn.Linear(d, r + 2 * n, bias=False)
        dt_proj = nn.Linear(r, d, bias=True)
        dt_proj._is_dt_proj = True
        # mamba_ssm's initialisation: dt log-uniform in [1e-3, 1e-1] through the softplus bias.
        std = r ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        a_log._no_weight_decay = True
        skip = nn.Parameter(torch.ones(d))
        skip._no_weight_decay = True
        self.add_module("conv1d" + suffix, conv)
        self.add_module("x_proj" + suffix, x_proj)
        self.add_module("dt_proj" + suffix, dt_proj)
        self.register_parameter(self._a_name(suffix), a_log)
        self.register_parameter("D" + suffix, skip)

    def _a_name(self, suffix: str) -> str:
        return f"A{suffix}_log" if self.hold_middle else "A_log" + suffix

    def _a_log(self, suffix: str) -> torch.Tensor:
        return getattr(self, self._a_name(suffix))

    def _reorder(self, x: torch.Tensor, suffix: str, inverse: bool = False) -> torch.Tensor:
        """Put a (B, C, L) row-major sequence into the direction's scan order, or back with inverse."""
        if self.hold_middle:
            idx = self.scan_orders(x.shape[-1], x.device)[self.directions.index(suffix)]
            return x[..., torch.argsort(idx) if inverse else idx]
        flip, transpose = suffix.endswith("_b"), suffix.startswith("_c")
        if transpose:
            b, c, length = x.shape
            if self.grid is None or self.grid ** 2 != length:
                raise ValueError(f"column scans need the full square grid of tokens; got {length} tokens "
                                 f"for grid {self.grid}")
        if flip and inverse:
            x = x.flip(-1)
        if transpose:
            # the transpose of a square grid is its own inverse
            x = x.reshape(b, c, self.grid, self.grid).transpose(-1, -2).reshape(b, c, length)
        if flip and not inverse:
            x = x.flip(-1)
        return x

    def _scan(self, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
        length = x.shape[-1]
        conv = getattr(self, "conv1d" + suffix)
        x = F.silu(conv(x)[..., :length])
        x_dbl = getattr(self, "x_proj" + suffix)(x.transpose(1, 2))          # (B, L, r + 2n)
        dt, b_in, c_in = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_proj = getattr(self, "dt_proj" + suffix)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)                   # (B, d, L); bias goes to the scan
        a = -torch.exp(self._a_log(suffix).float())
        return selective_scan(x, delta, a, b_in.transpose(1, 2), c_in.transpose(1, 2),
                              D=getattr(self, "D" + suffix).float(), z=z, delta_bias=dt_proj.bias.float(),
                              delta_softplus=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, dim) -> (B, L, dim); with several directions their outputs are averaged.

        Several directions on a CPU run as one batched computation (`_scan_merged`: the same
        arithmetic, a quarter of the per-step dispatches for 4-way); with the compiled CPU kernels a
        single direction takes that path too (the compiled conv and the channels-last layout), and in
        float32/float64 outside autocast the compiled ops run as one autograd node (`_core_merged`,
        `mixer_merged`: the same bits, without autograd's concatenations and copies in the backward).
        On CUDA each direction calls mamba-ssm's kernel (`_scan`), which takes one parameter set per call.
        """
        xz_rows = self.in_proj(hidden)                                      # (B, L, 2d)
        if (self.merge_directions and self.fold_directions and self.fused_core and xz_rows.dtype == hidden.dtype
                and fused_applies(hidden)):
            return self.out_proj(self._core_merged(xz_rows).transpose(1, 2))
        xz = xz_rows.transpose(1, 2)                                        # (B, 2d, L)
        x, z = xz.chunk(2, dim=1)
        if self.merge_directions and not hidden.is_cuda and (len(self.directions) > 1 or compiled_cpu(hidden)):
            y = self._scan_merged(x, z)                      # the directions' mean, (B, d, L), in token order
        else:
            ys = [self._reorder(self._scan(self._reorder(x, s), self._reorder(z, s), s), s, inverse=True)
                  for s in self.directions]
            total = None
            for y in ys:
                total = y if total is None else total + y
            y = total if len(ys) == 1 else total / len(ys)
        return self.out_proj(y.transpose(1, 2))

    merge_directions = True  # class default; set False on an instance to force the per-direction path
    # class default; False repeats z for every direction and averages the stacked outputs in torch (the
    # compiled kernel's grouped scan does both in place; tests compare the two, which agree bit for bit)
    fold_directions = True
    # class default; False composes the compiled path from the conv and scan ops under autograd instead of
    # the one node of `mixer_merged` (the same arithmetic, without the backward's concatenations and copies)
    fused_core = True

    def scan_orders(self, length: int, device=None) -> torch.Tensor:
        """(directions, length) int64: step t of direction g's scan reads token orders[g, t] (row-major
        tokens; `_reorder` as an index, so that the scan reads each direction in place)."""
        rows = []
        for suffix in self.directions:
            idx = torch.arange(length, device=device)
            if self.hold_middle and suffix.startswith("_c"):
                idx = self._held_column_order(length, device)
            elif suffix.startswith("_c"):
                if self.grid is None or self.grid ** 2 != length:
                    raise ValueError(f"column scans need the full square grid of tokens; got {length} tokens "
                                     f"for grid {self.grid}")
                idx = idx.view(self.grid, self.grid).t().reshape(-1)
            if suffix.endswith("_b"):
                idx = idx.flip(0)
            rows.append(idx)
        return torch.stack(rows)

    def _held_column_order(self, length: int, device=None) -> torch.Tensor:
        """The released column order: the tokens other than L//2 (row-major over the grid) transposed, and
        token L//2 put back at position L//2. Transposing a square grid is its own inverse, so the released
        code's way back (take L//2 out, transpose, put it back) is this order's inverse permutation. L//2 is the
        class token's place (M//2) for an even grid; for an odd one it is the patch after it, as there."""
        if self.grid is None or self.grid ** 2 + 1 != length:
            raise ValueError(f"the released column scans need the grid's tokens and a class token; got {length} "
                             f"tokens for grid {self.grid}")
        held = length // 2
        idx = torch.arange(length, device=device)
        others = torch.cat([idx[:held], idx[held + 1:]]).view(self.grid, self.grid).t().reshape(-1)
        return torch.cat([others[:held], idx[held:held + 1], others[held:]])

    def _direction_modules(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        """(conv1d, x_proj, dt_proj) of every direction, in `directions` order."""
        return [(getattr(self, "conv1d" + s), getattr(self, "x_proj" + s), getattr(self, "dt_proj" + s))
                for s in self.directions]

    def _core_merged(self, xz: torch.Tensor) -> torch.Tensor:
        """`_scan_merged` with the compiled kernels as one autograd node (`mixer_merged`); xz (B, L, 2d)."""
        dirs = self.directions
        mods = self._direction_modules()

        dtype = xz.dtype
        return merged_mixer_core(
            xz, _stack_directions([c.weight[:, 0, :] for c, _, _ in mods]).to(dtype),
            _stack_directions([c.bias for c, _, _ in mods]).to(dtype),
            _stack_directions([xp.weight for _, xp, _ in mods]).to(dtype),
            _stack_directions([dp.weight for _, _, dp in mods]).to(dtype),
            -torch.exp(_stack_directions([self._a_log(s) for s in dirs]).float()).to(dtype),
            # A, D and the dt bias pass through float32 as in the other paths (and mamba-ssm's kernel)
            _stack_directions([getattr(self, "D" + s) for s in dirs]).float().to(dtype),
            _stack_directions([dp.bias for _, _, dp in mods]).float().to(dtype),
            self.scan_orders(xz.shape[1], xz.device), self.d_state)

    def _scan_merged(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Every direction's `_scan` at once: directions stacked as channels for the depthwise conv
        and as a leading dim for the projections, then folded into the batch of one selective scan
        whose A, D and dt bias are given per sequence. The causal conv needs each direction's scan
        order (one gather of x); everything after it stays in token order and the scan is told each
        direction's order (`order=`), so z is not reordered and the outputs need no inverse reorder.
        Returns the mean of the directions' outputs in token order, (B, d, L). With the compiled kernels
        the scan itself gates every direction by the one z and averages them (`groups`); the pure-PyTorch
        path repeats z for every direction and averages the stacked outputs (the same numbers)."""
        dirs = self.directions
        g, (b, d, length) = len(dirs), x.shape
        n, r = self.d_state, self.dt_rank
        orders = self.scan_orders(length, x.device)                                   # (G, L)
        mods = self._direction_modules()

        x_proj_w = _stack_directions([xp.weight for _, xp, _ in mods])               # (G, r + 2n, d)
        dt_proj_w = _stack_directions([dp.weight for _, _, dp in mods])              # (G, d, r)
        compiled = compiled_cpu(x)
        grouped = compiled and self.fold_directions   # the kernel gates every direction by z and averages them
        if compiled:
            # channels innermost throughout: the compiled conv writes (G, B, L, d) in token order, the
            # projections are batched matmuls over it, and the scan reads u, delta, z and writes its
            # output in that layout (no gathers, no layout copies; the output's transpose is contiguous)
            conv_w = _stack_directions([c.weight[:, 0, :] for c, _, _ in mods])     # (G, d, k)
            xc = mixer_conv.causal_conv_silu(x, conv_w, _stack_directions([c.bias for c, _, _ in mods]), orders)
            x_dbl = torch.matmul(xc.view(g, b * length, d), x_proj_w.transpose(1, 2))  # (G, B*L, r + 2n)
            dt, b_in, c_in = torch.split(x_dbl, [r, n, n], dim=-1)
            delta = torch.matmul(dt, dt_proj_w.transpose(1, 2))                     # (G, B*L, d)

            u, delta, b_in, c_in = (seq_major(t, g, b, length)
                                    for t in (xc.view(g, b * length, d), delta, b_in, c_in))
            if grouped:
                z_all = z                       # read once per batch row by every direction (`groups`)
            else:
                z_rows = z.transpose(1, 2).unsqueeze(0).expand(g, b, length, d).reshape(g, b * length, d)
                z_all = seq_major(z_rows, g, b, length)
        else:
            inverse = torch.argsort(orders, dim=-1)
            xs = x.unsqueeze(1).expand(b, g, d, length).gather(3, orders[None, :, None, :].expand(b, g, d, length))
            conv_w = torch.cat([c.weight for c, _, _ in mods])                       # (G*d, 1, k)
            conv_b = torch.cat([c.bias for c, _, _ in mods])
            xc = F.conv1d(xs.reshape(b, g * d, length), conv_w, conv_b, padding=self.d_conv - 1, groups=g * d)
            xc = F.silu(xc[..., :length]).view(b, g, d, length)
            xc = xc.gather(3, inverse[None, :, None, :].expand(b, g, d, length))     # back to token order
            x_dbl = torch.einsum("bgdl,ged->bgle", xc, x_proj_w)
            dt, b_in, c_in = torch.split(x_dbl, [r, n, n], dim=-1)                 # (B, G, L, .)
            delta = torch.einsum("bglr,gdr->gbdl", dt, dt_proj_w).reshape(g * b, d, length)
            u = xc.transpose(0, 1).reshape(g * b, d, length)
            b_in = b_in.transpose(0, 1).reshape(g * b, length, n).transpose(1, 2)
            c_in = c_in.transpose(0, 1).reshape(g * b, length, n).transpose(1, 2)
            z_all = z.unsqueeze(0).expand(g, b, d, length).reshape(g * b, d, length)

        a = -torch.exp(_stack_directions([self._a_log(s) for s in dirs]).float())
        params = dict(D=per_sequence(_stack_directions([getattr(self, "D" + s) for s in dirs]).float(), b), z=z_all,
                      delta_bias=per_sequence(_stack_directions([dp.bias for _, _, dp in mods]).float(), b),
                      delta_softplus=True, order=per_sequence(orders, b))
        if grouped:
            return selective_scan_compiled(u, delta, per_sequence(a, b), b_in, c_in, **params, groups=g)
        y = selective_scan(u, delta, per_sequence(a, b), b_in, c_in, **params).view(g, b, d, length)
        return y[0] if g == 1 else y.mean(0)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * value, the halves of fc1's output; with the compiled gate fc1's bias is added by the
        # gate (the same sums: the matmul's bias is added after its dot products), not in a pass of its own
        if self.fc1.bias is not None and self.fc1.bias.dtype == x.dtype and fused_applies(x):
            return self.fc2(swiglu(F.linear(x, self.fc1.weight), self.fc1.bias))
        return self.fc2(swiglu(self.fc1(x)))


class ReleasedSwiGLU(nn.Module):
    """The released code's MLP: w3(silu(w1 x) * w2 x), each linear with a bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MambaBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.arch == "released":
            self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.mixer = MambaMixer(cfg.dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, cfg.directions,
                                    cfg.grid, hold_middle=cfg.class_token)
            self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.mlp = ReleasedSwiGLU(cfg.dim, cfg.mlp_width)
            return
        self.norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg.dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank,
                                cfg.directions, cfg.grid)
        self.norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ChannelNorm(nn.Module):
    """LayerNorm over channels at each location of a (B, C, H, W) map: nothing mixes across locations
    or studies (a batch norm would share statistics with the patches stage 1 must predict)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stem(in_chans: int, dim: int, patch: int, eps: float = 1e-5) -> nn.Sequential:
    """Non-overlapping convolutions from pixels to one token per `patch` x `patch` patch: 4x4 stride 4,
    then 2x2 stride 2 until the patch is covered, channels growing to `dim`, norm and GELU between."""
    steps = [4] + [2] * int(math.log2(patch // 4))
    widths = [max(dim // 2 ** (len(steps) - 1 - i), 8) for i in range(len(steps))]
    layers: list[nn.Module] = []
    cin = in_chans
    for i, (k, w) in enumerate(zip(steps, widths)):
        layers.append(nn.Conv2d(cin, w if i < len(steps) - 1 else dim, k, stride=k))
        if i < len(steps) - 1:
            layers += [_ChannelNorm(w, eps), nn.GELU()]
        cin = w
    return nn.Sequential(*layers)


class VisionMamba(nn.Module):
    """Images (B, C, S, S) -> EncoderOutput. Grey input feeds an RGB encoder by repetition and vice versa."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        if cfg.arch == "released":
            self._build_released(cfg)
            return
        self.patch_embed = (nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
                            if cfg.stem == "patch" else conv_stem(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.norm_eps))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.dim, cfg.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.apply(_init_linear)

    def _build_released(self, cfg: EncoderConfig) -> None:
        """The released code's encoder (module docstring); its initialisation's distributions (not its draws)."""
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        if cfg.class_token:
            self.cls_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, cfg.dim), std=0.02))
            self.cls_token._no_weight_decay = True
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, cfg.num_tokens, cfg.dim), std=0.02))
        else:
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.dim, cfg.grid, columns_first=True)[None],
                                          requires_grad=False)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.apply(_init_linear)

    @property
    def class_token_index(self) -> int | None:
        """Where the class token sits in the token sequence (M//2), or None without one."""
        return self.config.num_patches // 2 if self.config.class_token else None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, grid*grid, dim) row-major patch tokens with positions added (the released
        4-way encoder: (B, 1 + grid*grid, dim), the class token at `class_token_index`)."""
        cfg = self.config
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
            raise ValueError(f"encoder expects {cfg.image_size}x{cfg.image_size} images, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        x = self.patch_embed(match_channels(images, cfg.in_chans)).flatten(2).transpose(1, 2)
        if cfg.class_token:
            at = self.class_token_index
            x = torch.cat([x[:, :at], self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x[:, at:]], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def forward_tokens(self, x: torch.Tensor, return_layers: Sequence[int] = ()) -> EncoderOutput:
        """Run the blocks on a token sequence (B, L, dim); `return_layers` are 1-based block depths."""
        wanted = set(return_layers)
        bad = [d for d in wanted if not 1 <= d <= len(self.blocks)]
        if bad:
            raise ValueError(f"return_layers {bad} outside 1..{len(self.blocks)}")
        layers = []
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x)
            if depth in wanted:
                layers.append(x)
        tokens = self.norm(x)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(dim=1), layers=layers)

    def forward(self, images: torch.Tensor, return_layers: Sequence[int] = ()) -> EncoderOutput:
        return self.forward_tokens(self.embed(images), return_layers)


def _init_linear(module: nn.Module) -> None:
    """Biases start at zero, except dt_proj's, which sets the initial step sizes."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module, "_is_dt_proj", False):
        nn.init.zeros_(module.bias)


def study_tokens(encoder: VisionMamba, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M, C, S, S) views with a (B, M) mask -> (B, L, dim) tokens averaged over the real views."""
    if images.ndim == 4:
        return encoder(images).tokens
    b, m = images.shape[:2]
    if mask is None:
        mask = torch.ones(b, m, dtype=torch.bool, device=images.device)
    if not bool(mask.any(dim=1).all()):
        missing = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"studies at batch positions {missing} have no image")
    tokens = encoder(images[mask]).tokens
    out = tokens.new_zeros(b, m, *tokens.shape[1:])
    out[mask] = tokens
    return out.sum(1) / mask.sum(1).to(tokens.dtype)[:, None, None]


def expand_to_four_way(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 1-way encoder state dict -> a 4-way one: each new direction starts as a copy of the 1-way weights."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part in DIRECTION_PARAMS and i > 0 and parts[i - 1] == "mixer":
                for suffix in DIRECTIONS["4-way"][1:]:
                    new = ".".join(parts[:i] + [part + suffix] + parts[i + 1:])
                    out[new] = value.clone()
                break
    return out
