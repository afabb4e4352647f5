"""The released MambaXray-VL checkpoints as our `VisionMamba` (`EncoderConfig(arch="released")`).

The released code (Event-AHU/Medical_Image_Analysis, CXPMRG_Bench_MambaXray_VL) saves three kinds of file:

* stage 1 (`pretrain/`): `{"model", "optimizer", "epoch", "scaler", "args"}`, "model" the whole pre-training
  network: the encoder (`patch_embed.proj`, fixed sin-cos `pos_embed` (1, M, D) at 192 px, `layers.*` with one
  scan direction, no class token, no final norm) and its decoder side (`dec*`, `enc2dec`, `ar_token`, `ar_norm`,
  `ar_pred`, the feature norms `norm_1`..`norm_4`, the attention `mask` buffer);
* stage 2 (`MambaXrayVL_CLIP`): `{"model", "config", "epoch", "step"}`, the trained parameters: the encoder
  under `visual_encoder.` (4-way, class token, learned `pos_embed` (1, 1+M, D), `norm_f`) and the text side
  (`text_encoder.*`, `vision_proj`, `text_proj`, `logit_scale`);
* stage 3 (`MambaXrayVL_DownStream`): the same layout with `visual_encoder.*`, `llama_proj.*`, `layer_norm.*`.

`load_encoder` reads any of them (or a bare released encoder state dict) with `map_location="cpu"`, infers the
architecture from the tensors' shapes, and refuses a missing or unexpected key by name. Our module names
differ from the released ones only outside the mixer; the mapping (`RELEASED_NAMES`, both ways exact):
`patch_embed.proj.*` <-> `patch_embed.*`, `layers.<i>.*` <-> `blocks.<i>.*`, `norm_f.*` <-> `norm.*`; the
mixer's parameters (per direction: conv1d, x_proj, dt_proj, A_log, D with the suffixes "", "_b", "_c",
"_c_b", A named A_log, A_b_log, A_c_log, A_c_b_log), the block norms, the MLP's w1, w2, w3, `pos_embed` and
`cls_token` carry the released names. A stage-1 file's encoder has no final norm of its own: its last
block's output is read through `norm_4` by the decoder, which becomes our `norm` (the stage-1 encoder runs on
tokens in the 4x4-cluster order of `arm.cluster_order`, without the last cluster: `forward_tokens`).
`stage1_to_stage2` turns a stage-1 encoder into the stage-2 layout the way the released stage 2 does.

A released checkpoint is a pickle (its "args" and "config" are Python objects): load only files you trust.
Those objects' classes need not be importable here; they are read as empty stand-ins.
"""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from cxpmrg_lib.models.vision_mamba import RELEASED_DIRECTIONS, EncoderConfig, VisionMamba
from cxpmrg_lib.util.errors import DataError

__all__ = ["load_encoder", "read_released", "stage1_to_stage2", "to_released_names", "from_released_names",
           "released_config", "ReleasedCheckpointError", "RELEASED_NAMES", "STAGE1_EXTRAS", "STAGE2_EXTRAS",
           "STAGE3_EXTRAS"]

# (released prefix, our prefix), applied to the start of a key.
RELEASED_NAMES = (("patch_embed.proj.", "patch_embed."), ("layers.", "blocks."), ("norm_f.", "norm."))
# Keys of a file that are not the encoder's, by the stage that wrote them (regular expressions, whole key).
STAGE1_EXTRAS = (r".*dec.*", r"ar_token", r"ar_norm\..*", r"ar_pred\..*", r"norm_[123]\..*", r"mask")
STAGE2_EXTRAS = (r"text_encoder\..*", r"vision_proj\..*", r"text_proj\..*", r"logit_scale")
STAGE3_EXTRAS = (r"llama_proj\..*", r"layer_norm\..*")
_VISUAL = "visual_encoder."
_STAGE1_NORM = "norm_4."          # the norm the stage-1 decoder reads the last block's output through


class ReleasedCheckpointError(DataError):
    """A released checkpoint that does not hold what its stage's encoder needs (or holds more); a DataError (a
    ValueError) that names the file, so that the command line reports it in one line."""


def _renamed(state_dict: Mapping[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
    """Each key with the first matching prefix of (old, new) `pairs` replaced."""
    out = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def to_released_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's state dict under the released names (stage-2/3 layout)."""
    return _renamed(state_dict, [(ours, theirs) for theirs, ours in RELEASED_NAMES])


def from_released_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released encoder state dict (stage-2/3 names) under our names."""
    return _renamed(state_dict, RELEASED_NAMES)


class _Stub:
    """Stands in for a pickled object whose class is not importable here (the files' "args", "config")."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": "cxpmrg_lib.models.released._stubs"})


class _LenientPickle:
    """A pickle module for torch.load whose Unpickler reads unknown classes as stand-ins."""
    Unpickler = _LenientUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def read_released(source) -> tuple[dict[str, torch.Tensor], str]:
    """(the model state dict, a name for messages) of a released file, a loaded checkpoint or a state dict."""
    name = "the given state dict"
    obj = source
    if isinstance(source, (str, Path)):
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"no released checkpoint at {name}")
        try:
            try:
                obj = torch.load(source, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:   # the files' "args"/"config" objects: read them as stand-ins
                obj = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as e:
            raise ReleasedCheckpointError(f"{name}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReleasedCheckpointError(f"{name}: not a released checkpoint (a dict of tensors, or one under 'model')")
    return dict(obj), name


def _matches(key: str, patterns) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def _split(state: dict[str, torch.Tensor], name: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """(stage, the encoder's keys under released stage-2 names, keys that belong to no known part)."""
    if any(k.startswith(_VISUAL) for k in state):
        encoder = {k[len(_VISUAL):]: v for k, v in state.items() if k.startswith(_VISUAL)}
        rest = [k for k in state if not k.startswith(_VISUAL)]
        stage = "3" if any(_matches(k, STAGE3_EXTRAS) for k in rest) else "2"
        extras = STAGE3_EXTRAS if stage == "3" else STAGE2_EXTRAS
        return stage, encoder, [k for k in rest if not _matches(k, extras)]
    if "cls_token" in state or any(".mixer.conv1d_b." in k for k in state):
        return "2", dict(state), []                     # a bare stage-2/3 encoder state dict
    encoder = {k: v for k, v in state.items() if not _matches(k, STAGE1_EXTRAS) and not k.startswith("norm_4.")}
    for key in [k for k in state if k.startswith(_STAGE1_NORM)]:
        encoder["norm_f." + key[len(_STAGE1_NORM):]] = state[key]
    return "1", encoder, []


def _need(encoder: dict, key: str, name: str) -> torch.Tensor:
    if key not in encoder:
        raise ReleasedCheckpointError(f"{name}: missing key {key!r} (needed to tell the encoder's shape)")
    return encoder[key]


def released_config(encoder: Mapping[str, torch.Tensor], name: str = "the state dict") -> EncoderConfig:
    """The `EncoderConfig(arch="released")` of a released encoder state dict (stage-2 names), from its shapes."""
    patch = _need(encoder, "patch_embed.proj.weight", name)
    dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = len({int(m.group(1)) for k in encoder if (m := re.match(r"layers\.(\d+)\.", k))})
    if depth == 0:
        raise ReleasedCheckpointError(f"{name}: no encoder blocks (keys layers.<i>.*)")
    four_way = "layers.0.mixer.conv1d_b.weight" in encoder or "cls_token" in encoder
    a_log = _need(encoder, "layers.0.mixer.A_log", name)
    d_inner, d_state = a_log.shape
    if d_inner % dim:
        raise ReleasedCheckpointError(f"{name}: mixer width {d_inner} is not a multiple of the width {dim}")
    dt_rank = _need(encoder, "layers.0.mixer.dt_proj.weight", name).shape[1]
    d_conv = _need(encoder, "layers.0.mixer.conv1d.weight", name).shape[-1]
    hidden = _need(encoder, "layers.0.mlp.w1.weight", name).shape[0]
    tokens = _need(encoder, "pos_embed", name).shape[1] - int(four_way)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ReleasedCheckpointError(f"{name}: pos_embed holds {tokens} patch positions, not a square grid")
    cfg = dict(image_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, dim=dim, depth=depth,
               d_state=d_state, d_conv=d_conv, expand=d_inner // dim, scan="4-way" if four_way else "1-way",
               dt_rank=None if dt_rank == math.ceil(dim / 16) else dt_rank, arch="released")
    if hidden != EncoderConfig(**cfg).mlp_width:
        cfg["mlp_hidden"] = hidden
    return EncoderConfig(**cfg)


def load_encoder(source) -> VisionMamba:
    """A released stage-1, -2 or -3 checkpoint (path, loaded dict, or a released encoder state dict) as our
    `VisionMamba` in eval mode, on the CPU, in float32.

    Stages 2-3 give the 4-way encoder whose `forward(images).tokens` is the released `forward_features`:
    (B, 1+M, dim), the class token at index M//2 (`class_token_index`), for (B, 3, S, S) images already
    normalised (the Swin image processor's mean and std, S = 224 for the released models). A stage-1 file
    gives the 1-way stage-1 encoder (no class token, fixed sin-cos positions, 192 px); see the module docstring.
    Every key must be the encoder's or a known part of its stage's file: a missing or unexpected one raises
    `ReleasedCheckpointError` naming it and the file.
    """
    state, name = read_released(source)
    stage, encoder, stray = _split(state, name)
    cfg = released_config(encoder, name)
    if (stage == "1") == (cfg.scan == "4-way"):
        raise ReleasedCheckpointError(f"{name}: a stage-{stage} file whose encoder scans {cfg.scan} "
                                      f"(stage 1 scans one way without a class token, stages 2-3 four ways with one)")
    model = VisionMamba(cfg)
    prefixed = any(k.startswith(_VISUAL) for k in state)

    def in_file(key: str) -> str:                    # the name a key of `encoder` has in the file
        if stage == "1" and key.startswith("norm_f."):
            return _STAGE1_NORM + key[len("norm_f."):]
        return _VISUAL + key if prefixed else key

    expected = to_released_names(model.state_dict())
    missing = sorted(in_file(k) for k in set(expected) - set(encoder))
    unexpected = sorted([in_file(k) for k in set(encoder) - set(expected)] + stray)
    parts = []
    if missing:
        parts.append(f"missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    if unexpected:
        parts.append(f"unexpected key{'s' * (len(unexpected) > 1)} {', '.join(map(repr, unexpected))}")
    if parts:
        raise ReleasedCheckpointError(f"{name}: " + "; ".join(parts))
    try:
        model.load_state_dict(from_released_names(encoder), strict=True)
    except RuntimeError as e:
        raise ReleasedCheckpointError(f"{name}: {e}") from None
    return model.eval()


def stage1_to_stage2(source, image_size: int = 224, cls_token: torch.Tensor | None = None,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """A released stage-1 checkpoint's encoder in the stage-2 layout, as the released stage 2 starts from it
    (`MambaXrayVL_CLIP.__init__`): a released-named state dict that `load_encoder` reads.

    As there: every direction's parameters (conv1d, x_proj, dt_proj, A_log, D) copied from the one direction
    into "_b", "_c" and "_c_b"; the decoder's keys dropped; the position embedding resized bicubically
    (align_corners=False) from the stage-1 grid to image_size / patch and a zero vector inserted at
    position N//2 for the class token; the keys stage 1 does not have keep the stage-2 model's initial values:
    norm_f weight 1 and bias 0, and the class token, drawn there from trunc_normal(std=0.02) with the global
    generator: here `cls_token` (1, 1, D) if given, else drawn from that distribution with `seed`.
    """
    state, name = read_released(source)
    stage, encoder, _ = _split(state, name)
    if stage != "1":
        raise ReleasedCheckpointError(f"{name}: not a stage-1 checkpoint (it has a class token or 4-way scans)")
    encoder.pop("norm_f.weight", None)           # stage 1 has no final norm (norm_4 is the decoder's)
    encoder.pop("norm_f.bias", None)
    out = {}
    for key, value in encoder.items():
        out[key] = value
        match = re.fullmatch(r"(layers\.\d+\.mixer\.)(conv1d|x_proj|dt_proj)(\..+)", key)
        if match:
            for suffix in RELEASED_DIRECTIONS["4-way"][1:]:
                out[match.group(1) + match.group(2) + suffix + match.group(3)] = value.clone()
        match = re.fullmatch(r"(layers\.\d+\.mixer\.)(A_log|D)", key)
        if match:
            for suffix in RELEASED_DIRECTIONS["4-way"][1:]:
                new = "A" + suffix + "_log" if match.group(2) == "A_log" else "D" + suffix
                out[match.group(1) + new] = value.clone()
    pos = _need(encoder, "pos_embed", name)
    dim = pos.shape[-1]
    patch = encoder["patch_embed.proj.weight"].shape[-1]
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    old, new = math.isqrt(pos.shape[1]), image_size // patch
    if old != new:
        grid = pos.reshape(1, old, old, dim).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        pos = pos.flatten(1, 2)
    n = pos.shape[1]
    out["pos_embed"] = torch.cat([pos[:, :n // 2], pos.new_zeros(1, 1, dim), pos[:, n // 2:]], dim=1)
    if cls_token is None:
        gen = torch.Generator().manual_seed(seed)
        cls_token = torch.nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02, generator=gen)
    if tuple(cls_token.shape) != (1, 1, dim):
        raise ValueError(f"cls_token must be (1, 1, {dim}), not {tuple(cls_token.shape)}")
    out["cls_token"] = cls_token
    out["norm_f.weight"] = torch.ones(dim)
    out["norm_f.bias"] = torch.zeros(dim)
    return out
