"""The released MambaXray-VL stage-3 model (`MambaXrayVL_DownStream`) from its files, for generating reports.

A study's views each go through the released encoder (`models.released`), their (1+M, dim) token sequences
are averaged, projected (`llama_proj`, Linear to the LM width) and normalised (`layer_norm`), and spliced at
`<ImageHere>` into `Human: <Img><ImageHere></Img> Generate a comprehensive and detailed diagnosis report for
this chest xray image. \\nAssistant:` after the BOS embedding: the two halves of the prompt tokenized without
special tokens. The LM, frozen, generates from those embeddings alone (no attention mask: all ones), and a
report is decoded as the released `decode` does: a leading token 0, then a leading token 1 dropped, the text cut
at the first `</s>`, stripped, `<unk>` removed. Decoding defaults: beam 3, 80-120 new tokens, repetition
penalty 2.0, length penalty 2.0 (the released `config.py`; its `temperature=0` is not passed: beam search
without sampling ignores it).

Loading follows the released stage 3: the encoder from the stage-2 file's `visual_encoder.*` (strict), then
the stage-3 file's `visual_encoder.*` over it and its `llama_proj`, `layer_norm` (here each stage-3 key must be
one of those, and `llama_proj` and `layer_norm` must be there). The LM and its tokenizer come from a local
folder, read offline. The released code runs the LM in float16 on a GPU; here its dtype is `lm_dtype`
(float32 by default, for the CPU), the encoder and projection in float32.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxpmrg_lib.models.released import (ReleasedCheckpointError, from_released_names, load_encoder, read_released,
                                       to_released_names)
from cxpmrg_lib.models.vision_mamba import VisionMamba, study_tokens
from cxpmrg_lib.util.errors import DataError

__all__ = ["ReleasedReportModel", "load_released_report_model", "released_checkpoints", "check_causal_lm_dir", "PROMPT",
           "RELEASED_DECODING", "IU_DECODING", "SWIN_MEAN", "SWIN_STD", "released_pixels"]

logger = logging.getLogger(__name__)

PROMPT = ("Human: <Img><ImageHere></Img> Generate a comprehensive and detailed diagnosis report for this chest "
          "xray image. \nAssistant:")
RELEASED_DECODING = dict(num_beams=3, min_new_tokens=80, max_new_tokens=120, repetition_penalty=2.0,
                         length_penalty=2.0)
# The released IU X-Ray script: beam 5, 40-100 new tokens, the same penalties.
IU_DECODING = dict(num_beams=5, min_new_tokens=40, max_new_tokens=100, repetition_penalty=2.0, length_penalty=2.0)
# The Swin image processor's normalisation (microsoft/swin-base-patch4-window7-224: ImageNet mean and std).
SWIN_MEAN = (0.485, 0.456, 0.406)
SWIN_STD = (0.229, 0.224, 0.225)
END_SYM = "</s>"


def released_pixels(path: str | os.PathLike, size: int = 224) -> torch.Tensor:
    """(3, size, size) float32 of an image file as the released data helper feeds it: RGB, resized bicubically
    (PIL) to size x size, scaled to [0, 1], normalised with the Swin processor's mean and std."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as pil:
        rgb = pil.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(SWIN_MEAN)[:, None, None]) / torch.tensor(SWIN_STD)[:, None, None]


class ReleasedReportModel(nn.Module):
    """Released encoder + llama_proj + layer_norm + a frozen causal LM (module docstring)."""

    def __init__(self, encoder: VisionMamba, llama_proj: nn.Linear, layer_norm: nn.LayerNorm, lm, tokenizer,
                 bos_token_id: int | None = None):
        super().__init__()
        self.encoder, self.llama_proj, self.layer_norm = encoder, llama_proj, layer_norm
        self.lm, self.tokenizer = lm, tokenizer
        lm.requires_grad_(False)
        lm.eval()
        # the released IU setting (Qwen, no BOS token of its own) sets it to 0; Llama's is 1
        self.bos_token_id = bos_token_id if bos_token_id is not None else (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0)
        self.decoding = dict(RELEASED_DECODING)
        self.image_size = encoder.config.image_size
        self.max_images = 2
        before, after = PROMPT.split("<ImageHere>")
        self.prompt_ids = tuple(torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long)
                                for part in (before, after))

    def load_views(self, paths) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, M, 3, S, S) normalised views of a study's image files and their (1, M) mask."""
        views = torch.stack([released_pixels(p, self.image_size) for p in paths])
        return views[None], torch.ones(1, len(paths), dtype=torch.bool)

    def image_embeds(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) or (B, M, 3, S, S) views -> (B, 1+M, LM width): the views' tokens averaged, projected,
        normalised."""
        return self.layer_norm(self.llama_proj(study_tokens(self.encoder, images, mask)))

    def prompt_embeds(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS, prompt before <ImageHere>, the image embeddings, prompt after] as the LM's input embeddings."""
        embed = self.lm.get_input_embeddings()
        img = self.image_embeds(images, mask)
        b, device = img.shape[0], img.device
        dtype = embed.weight.dtype
        bos = embed(torch.full((b, 1), self.bos_token_id, dtype=torch.long, device=device))
        before, after = (embed(ids.to(device))[None].expand(b, -1, -1) for ids in self.prompt_ids)
        return torch.cat([bos, before, img.to(dtype), after], dim=1)

    @torch.no_grad()
    def first_step_logits(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, vocab) the LM's logits for the report's first token."""
        return self.lm(inputs_embeds=self.prompt_embeds(images, mask)).logits[:, -1].float()

    def decode(self, ids: torch.Tensor) -> str:
        ids = ids.tolist()
        if ids and ids[0] == 0:
            ids = ids[1:]
        if ids and ids[0] == 1:
            ids = ids[1:]
        text = self.tokenizer.decode(ids)
        return text.split(END_SYM)[0].strip().replace("<unk>", "")

    @torch.no_grad()
    def generate(self, images: torch.Tensor, mask: torch.Tensor | None = None, **decoding) -> list[str]:
        """One report per study; `decoding` overrides `RELEASED_DECODING` (transformers' generate options)."""
        was = self.training
        self.eval()
        try:
            out = self.lm.generate(inputs_embeds=self.prompt_embeds(images, mask), do_sample=False,
                                   **{**self.decoding, **decoding})
        finally:
            self.train(was)
        return [self.decode(row) for row in out]


def _stage3_parts(path, dim: int) -> tuple[dict, dict]:
    """(the stage-3 file's visual_encoder keys under released names, its llama_proj/layer_norm tensors)."""
    state, name = read_released(path)
    visual = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    head = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    need = ("llama_proj.weight", "llama_proj.bias", "layer_norm.weight", "layer_norm.bias")
    missing = [k for k in need if k not in head]
    unexpected = sorted(k for k in head if k not in need)
    if missing or unexpected:
        raise ReleasedCheckpointError(f"{name}: " + "; ".join(
            ([f"missing {', '.join(map(repr, missing))}"] if missing else [])
            + ([f"unexpected {', '.join(map(repr, unexpected))}"] if unexpected else [])))
    if head["llama_proj.weight"].shape[1] != dim:
        raise ReleasedCheckpointError(f"{name}: llama_proj takes {head['llama_proj.weight'].shape[1]} features, "
                                      f"the encoder gives {dim}")
    return visual, head


def check_causal_lm_dir(llm_dir: str | os.PathLike) -> Path:
    """`llm_dir` if it is a local transformers folder of a causal LM (config.json naming a model type that
    AutoModelForCausalLM builds); else FileNotFoundError or a DataError naming the folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise FileNotFoundError(f"no LLM folder at {llm_dir}")
    if not (llm_dir / "config.json").is_file():
        raise DataError(f"{llm_dir}: not a transformers model folder (no config.json); give the folder of a "
                        "causal LM (Llama-2-7b-chat, Qwen1.5-1.8B-Chat) saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{llm_dir / 'config.json'}: not a transformers model config ({e})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise DataError(f"{llm_dir}: a {config.model_type!r} model, not a causal LM that AutoModelForCausalLM "
                        "loads (the released stage 3 needs Llama-2 or Qwen)")
    return llm_dir


def load_released_report_model(stage3: str | os.PathLike, llm_dir: str | os.PathLike,
                               stage2: str | os.PathLike | None = None, lm_dtype: torch.dtype = torch.float32,
                               use_fast: bool | None = None, bos_token_id: int | None = None) -> ReleasedReportModel:
    """The released stage-3 model from its files and a local LLM folder (read offline, no download).

    `stage2` may be left out when the stage-3 file holds the whole encoder (the released stage 3 trains it all).
    `use_fast`: the tokenizer kind; None takes the slow (sentencepiece) one as the released code does when the
    folder has one, else the fast one (logged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir = check_causal_lm_dir(llm_dir)            # before the checkpoints: a wrong folder fails at once
    state3, name3 = read_released(stage3)
    encoder = load_encoder(stage2) if stage2 is not None else load_encoder({k: v for k, v in state3.items()
                                                                             if k.startswith("visual_encoder.")})
    visual, head = _stage3_parts(stage3, encoder.config.dim)
    if stage2 is not None and visual:
        ours = from_released_names(visual)
        own = encoder.state_dict()
        stray = sorted("visual_encoder." + k for k, o in zip(visual, ours) if o not in own)
        if stray:
            raise ReleasedCheckpointError(f"{name3}: unexpected {', '.join(map(repr, stray))}")
        try:
            encoder.load_state_dict(ours, strict=False)
        except RuntimeError as e:
            raise ReleasedCheckpointError(f"{name3}: {e}") from None
    width = head["llama_proj.weight"].shape[0]
    llama_proj = nn.Linear(encoder.config.dim, width)
    layer_norm = nn.LayerNorm(width)
    with torch.no_grad():
        llama_proj.weight.copy_(head["llama_proj.weight"])
        llama_proj.bias.copy_(head["llama_proj.bias"])
        layer_norm.weight.copy_(head["layer_norm.weight"])
        layer_norm.bias.copy_(head["layer_norm.bias"])
    if use_fast is None:
        use_fast = not any((llm_dir / f).is_file() for f in ("tokenizer.model", "spiece.model"))
        logger.info("released report model: the %s tokenizer of %s", "fast" if use_fast else "slow", llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True, use_fast=use_fast)
    lm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, torch_dtype=lm_dtype)
    if lm.get_input_embeddings().weight.shape[1] != width:
        raise ReleasedCheckpointError(f"{name3}: llama_proj gives {width} features, the LM in {llm_dir} takes "
                                      f"{lm.get_input_embeddings().weight.shape[1]}")
    return ReleasedReportModel(encoder, llama_proj, layer_norm, lm, tokenizer, bos_token_id).eval()


def released_checkpoints(model) -> tuple[dict, dict]:
    """(stage-2 file, stage-3 file) objects for `torch.save` of one of our report models (`ReportModel`: an
    encoder with `arch="released"` and 4-way scans, a `VisualPrefixLM` head with the released prompt and a
    frozen LM without adapters), in the released layouts: stage 2 `{"model": visual_encoder.*, ...}` (the
    encoder only: our stage 2's text side is not the released one), stage 3 the same plus `llama_proj.*` (our
    head's `proj`) and `layer_norm.*` (its `proj_norm`). `load_released_report_model` reads them back."""
    enc, head = model.encoder, model.head
    cfg = enc.config
    if cfg.arch != "released" or not cfg.class_token:
        raise ValueError("only an encoder built with EncoderConfig(arch='released', scan='4-way') has the released "
                         f"layout; this one is arch={cfg.arch!r}, scan={cfg.scan!r}")
    if getattr(head, "prompt", None) != PROMPT:
        raise ValueError(f"the released stage 3 prompts with {PROMPT!r}; this model with {head.prompt!r}")
    if any("lora_" in n for n, _ in head.lm.named_parameters()):
        raise ValueError("the released stage 3 keeps its LM frozen without adapters; this model's LM has LoRA ones")
    visual = {"visual_encoder." + k: v.detach().float().cpu().clone()
              for k, v in to_released_names(enc.state_dict()).items()}
    head_state = {"llama_proj.weight": head.proj.weight, "llama_proj.bias": head.proj.bias,
                  "layer_norm.weight": head.proj_norm.weight, "layer_norm.bias": head.proj_norm.bias}
    head_state = {k: v.detach().float().cpu().clone() for k, v in head_state.items()}
    meta = {"config": {"exported_by": "cxpmrg_lib", "encoder": cfg.to_dict()}, "epoch": 0, "step": 0}
    return {"model": dict(visual), **meta}, {"model": {**visual, **head_state}, **meta}
