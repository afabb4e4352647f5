"""Stage 3 of MambaXray-VL: visual tokens -> Linear -> LayerNorm -> frozen causal LM.

The LM reads `[bos] Human: <Img>` + projected visual tokens + `</Img> Generate ... \\nAssistant:`
followed by the report and eos; only the report and eos are supervised. The LM is
either a small Llama-architecture model built fresh (with a byte-level BPE tokenizer
trained on the training reports, `train_bpe_tokenizer`) or any local
`AutoModelForCausalLM` checkpoint (Llama-2-7B-chat, Qwen1.5-1.8B, ...).

Tokenisation convention, shared by `lm_batch` (plain LM pre-training) and
`VisualPrefixLM`: text is always encoded with `add_special_tokens=False` and bos/eos
are added by hand, so a fresh BPE tokenizer and a pretrained one (which may or may not
add bos itself, or have none, like Qwen) behave the same way.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from cxpmrg_lib.util.progress import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from cxpmrg_lib.util.fileio import atomic_dir
from cxpmrg_lib.data.observations import CHEXPERT_LABELS

log = logging.getLogger(__name__)

# DataLoader workers fork after a tokenizer has run; its thread pool cannot survive that (results stay equal).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["PAPER_PROMPT", "IMAGE_TOKENS", "IMAGE_PLACEHOLDER", "ReportLMConfig", "LM_ARCHS", "train_bpe_tokenizer",
           "build_report_lm", "load_report_lm", "lm_batch", "median_report_tokens", "VisualPrefixLM",
           "condition_phrases", "CONDITIONINGS"]

PAPER_PROMPT = ("Human: <Img><ImageHere></Img> Generate a comprehensive and detailed diagnosis report "
                "for this chest xray image. \nAssistant:")
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TOKENS = ("<Img>", "</Img>", IMAGE_PLACEHOLDER)
# The paper's decoding budget (R2GenGPT on MIMIC-CXR / CheXpert Plus, Llama tokens).
PAPER_MIN_NEW_TOKENS, PAPER_MAX_NEW_TOKENS = 80, 120

PREFIX_CONFIG_NAME = "visual_prefix.json"
PREFIX_WEIGHTS_NAME = "visual_prefix.safetensors"
_LORA_MARK = "lora_"


# ----------------------------------------------------------------------------- tokenizer

def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4000,
                        min_frequency: int = 2, overwrite: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on report texts and save it (atomically) to `out_dir`.

    Byte-level: any text encodes without <unk> and decodes back exactly. `<s>`, `</s>`,
    `<pad>`, `<unk>` and the image tokens `<Img>`, `</Img>`, `<ImageHere>` are special
    tokens (single ids, never split, dropped by `skip_special_tokens`). Reload with
    `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_bpe_tokenizer got no non-empty text to train on")
    if vocab_size < 256 + 7:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte symbols plus 7 special tokens")
    specials = ["<s>", "<pad>", "</s>", "<unk>", *IMAGE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=list(IMAGE_TOKENS),
                                   clean_up_tokenization_spaces=False)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        fast.save_pretrained(tmp)
    log.info("trained a byte-level BPE tokenizer (%d tokens) on %d texts -> %s", len(fast), len(texts), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: reports could not end")
    return tokenizer.eos_token_id


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Pad id; eos where the tokenizer has none (Llama-2). Pads are masked and unsupervised."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def lm_batch(tokenizer: PreTrainedTokenizerBase, reports: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Plain causal-LM batch `[bos] report eos`, right-padded, at most `max_tokens` per row.

    Labels are the input ids (the model shifts them) with -100 on pads; bos is never a
    target. Used to pre-train a fresh report LM before it is frozen under the visual prefix.
    """
    eos, pad, bos = _eos_id(tokenizer), _pad_id(tokenizer), tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    room = max_tokens - len(head) - 1
    if room < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for report tokens besides bos/eos")
    rows = [head + _encode(tokenizer, r)[:room] + [eos] for r in reports]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if head:
        labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def median_report_tokens(tokenizer: PreTrainedTokenizerBase, reports: Iterable[str]) -> int:
    """Median report length in tokens (no bos/eos): the `typical_report_tokens` hint of VisualPrefixLM."""
    lengths = [len(_encode(tokenizer, r)) for r in reports]
    if not lengths:
        raise ValueError("median_report_tokens got no reports")
    return int(round(statistics.median(lengths)))


# ----------------------------------------------------------------------------- the language model

# Decoder-only architectures a fresh report LM can have (the language-model swap of the benchmark).
LM_ARCHS = ("llama", "qwen2", "mistral", "gpt2", "phi")


@dataclass
class ReportLMConfig:
    """A fresh tiny causal LM (`arch`: Llama by default), or `pretrained`: a local AutoModelForCausalLM folder."""
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int | None = None          # None: same as num_heads
    intermediate_size: int = 512
    max_position: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    seed: int = 0                            # initialisation of a fresh LM
    pretrained: str | None = None
    dtype: str = "auto"                      # pretrained only: "auto" keeps the checkpoint's dtype
    lora_rank: int = 0                       # > 0: LoRA adapters (q_proj, v_proj) through peft
    lora_alpha: float | None = None          # None: 2 * lora_rank
    arch: str = "llama"                      # fresh LM only: one of LM_ARCHS

    def __post_init__(self):
        if self.arch not in LM_ARCHS:
            raise ValueError(f"arch must be one of {LM_ARCHS}, not {self.arch!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["arch"] == "llama":   # the field came later: a Llama config keeps the dict (and run hashes) it had
            del d["arch"]
        return d


def _arch_config(config: ReportLMConfig, vocab: int, bos: int | None, eos: int, pad: int):
    """The transformers config of a fresh LM of `config.arch`, the same width, depth, heads and MLP size."""
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
               tie_word_embeddings=config.tie_word_embeddings)
    if config.arch == "gpt2":
        return tf.GPT2Config(n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
                             n_inner=config.intermediate_size, n_positions=config.max_position, **ids)
    common = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                  max_position_embeddings=config.max_position, rope_theta=config.rope_theta, **ids)
    kv = config.num_kv_heads or config.num_heads
    if config.arch == "phi":
        return tf.PhiConfig(num_key_value_heads=kv, **common)
    cls = {"llama": LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[config.arch]
    return cls(num_key_value_heads=kv, **common)


def build_report_lm(config: ReportLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM of `config.arch` sized by `config`, vocab and ids from `tokenizer`."""
    if config.pretrained:
        raise ValueError("build_report_lm builds a fresh LM; use load_report_lm for a pretrained one")
    arch = _arch_config(config, len(tokenizer), tokenizer.bos_token_id, _eos_id(tokenizer), _pad_id(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "llama":
            return LlamaForCausalLM(arch)
        return with_causal_lm_loss(AutoModelForCausalLM.from_config(arch))


def with_causal_lm_loss(lm: PreTrainedModel) -> PreTrainedModel:
    """Name the causal-LM loss on an LM whose class name does not (GPT2LMHeadModel): transformers would
    warn at every loss that `loss_type=None` is unrecognised, then use that same loss."""
    if getattr(lm, "loss_type", None) is None:
        lm.loss_type = "ForCausalLM"
    return lm


def load_report_lm(config: ReportLMConfig, tokenizer: PreTrainedTokenizerBase | None = None
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(LM, tokenizer): the local pretrained checkpoint with its own tokenizer, or a fresh LM on `tokenizer`.

    A pretrained tokenizer is used unchanged: `<ImageHere>` never reaches it (the prompt
    is split there and visual embeddings take its place) and `<Img>`/`</Img>` are
    ordinary text pieces, as in R2GenGPT, so no embedding row is added or left untrained.
    """
    if config.pretrained:
        path = Path(config.pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"pretrained LM folder {path} does not exist (nothing is downloaded)")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        lm = with_causal_lm_loss(AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=config.dtype))
    else:
        if tokenizer is None:
            raise ValueError("a fresh report LM needs a tokenizer (train_bpe_tokenizer)")
        lm = build_report_lm(config, tokenizer)
    if config.lora_rank:
        lm = _add_lora(lm, config)
    return lm, tokenizer


def _add_lora(lm: PreTrainedModel, config: ReportLMConfig) -> PreTrainedModel:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(f"lora_rank={config.lora_rank} needs peft: pip install 'cxpmrg_lib[lora]' (or pip install peft)") from e
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(lm, lora)


# ----------------------------------------------------------------------------- slot conditioning

# How a fresh report LM is pre-trained: "findings" puts the study's stated findings in the image slot (see
# VisualPrefixLM.condition_slot), "none" leaves the slot empty (the setting before; the LM then learns that
# nothing worth reading stands there, and a frozen LM that never conditioned on its slot does not start to).
CONDITIONINGS = ("findings", "none")
# Share of pre-training reports whose slot holds only filler: the LM keeps a prior for an uninformative slot.
UNCONDITIONED_SHARE = 0.1


def condition_phrases(labels) -> list[str]:
    """The findings a report states, as short phrases ("cardiomegaly", "possible edema", "no finding").

    `labels` maps the 14 CheXpert observations to 1.0 / -1.0 / 0.0 / NaN (a study table row);
    positives and uncertains become phrases, negatives and unmentioned ones do not.
    """
    out = []
    for name in CHEXPERT_LABELS:
        value = labels.get(name) if hasattr(labels, "get") else None
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if value == 1.0:
            out.append(name.lower())
        elif value == -1.0:
            out.append("possible " + name.lower())
    return out


# ----------------------------------------------------------------------------- the visual prefix head

class VisualPrefixLM(nn.Module):
    """Visual tokens -> Linear -> LayerNorm -> prompt-wrapped prefix of a frozen causal LM.

    With `freeze_lm` the LM (except LoRA adapters, if any) gets no gradient, stays in
    eval mode whatever `train()` is called with, and is left out of `state_dict()`, so a
    checkpoint of a model holding this head stores only what is trained; the LM is
    rebuilt from its own folder. All prefixes have the same length (one fixed prompt,
    T visual tokens from one (B, T, D) tensor), so batches need no left padding for
    generation; reports are right-padded for training.
    """

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, visual_dim: int,
                 prompt: str = PAPER_PROMPT, freeze_lm: bool = True, max_report_tokens: int = 128,
                 typical_report_tokens: int | None = None, proj_lr_scale: float = 1.0):
        super().__init__()
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt must contain {IMAGE_PLACEHOLDER} exactly once: {prompt!r}")
        if max_report_tokens < 1:
            raise ValueError(f"max_report_tokens must be >= 1, got {max_report_tokens}")
        embed = lm.get_input_embeddings()
        if embed.num_embeddings < len(tokenizer):
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LM only {embed.num_embeddings} "
                             "embedding rows: they do not belong together")
        self.lm, self.tokenizer = lm, tokenizer
        self.visual_dim, self.prompt, self.freeze_lm = int(visual_dim), prompt, freeze_lm
        self.max_report_tokens = int(max_report_tokens)
        self.typical_report_tokens = typical_report_tokens
        self.eos_id, self.pad_id, self.bos_id = _eos_id(tokenizer), _pad_id(tokenizer), tokenizer.bos_token_id
        hidden = embed.embedding_dim
        self.proj = nn.Linear(self.visual_dim, hidden)
        self.proj_norm = nn.LayerNorm(hidden)
        for p in (*self.proj.parameters(), *self.proj_norm.parameters()):
            p._lr_scale = float(proj_lr_scale)   # the trainer's per-part rate: a fresh projection learns faster
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        head = [self.bos_id] if self.bos_id is not None else []
        self.register_buffer("prompt_before_ids", torch.tensor(head + _encode(tokenizer, before)), persistent=False)
        self.register_buffer("prompt_after_ids", torch.tensor(_encode(tokenizer, after)), persistent=False)
        self.min_new_tokens, self.max_new_tokens = self._decoding_budget(typical_report_tokens)
        self._frozen_lm_keys: frozenset[str] = frozenset()
        if freeze_lm:
            for name, p in lm.named_parameters():
                p.requires_grad_(_LORA_MARK in name)
            lm.eval()
            self._frozen_lm_keys = frozenset("lm." + k for k in lm.state_dict() if _LORA_MARK not in k)
            self._load_prefix = ""
            self.register_state_dict_post_hook(_drop_frozen_lm_keys)
            self.register_load_state_dict_pre_hook(_remember_load_prefix)
            self.register_load_state_dict_post_hook(_forgive_missing_lm_keys)

    def _decoding_budget(self, typical: int | None) -> tuple[int, int]:
        """min/max new tokens: the paper's 80/120, or 0.5x/1.5x a typical report length.

        The paper's 80-120 fits MIMIC-style findings in Llama tokens (roughly 60-90 words);
        other tokenizers and datasets differ, so a measured typical length scales the same
        ratio. The maximum never exceeds what training supervised (max_report_tokens + eos).
        """
        cap = self.max_report_tokens + 1
        if typical is None:
            lo, hi = PAPER_MIN_NEW_TOKENS, PAPER_MAX_NEW_TOKENS
        else:
            if typical < 1:
                raise ValueError(f"typical_report_tokens must be >= 1, got {typical}")
            lo, hi = max(1, round(0.5 * typical)), math.ceil(1.5 * typical)
        hi = min(hi, cap)
        return min(lo, hi), hi

    def train(self, mode: bool = True) -> "VisualPrefixLM":
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()
        return self

    @property
    def prefix_length(self) -> int:
        """Prompt tokens around the visual tokens (bos included); add T for the full prefix."""
        return len(self.prompt_before_ids) + len(self.prompt_after_ids)

    def _prefix_embeds(self, visual_tokens: torch.Tensor | None, slot: torch.Tensor | None = None) -> torch.Tensor:
        embed = self.lm.get_input_embeddings()
        if slot is not None:                 # slot content given in the LM's embedding space (LM pre-training)
            vis = slot.to(embed.weight.dtype)
        else:
            if visual_tokens.dim() != 3 or visual_tokens.shape[-1] != self.visual_dim:
                raise ValueError(f"visual_tokens must be (B, T, {self.visual_dim}), got {tuple(visual_tokens.shape)}")
            vis = self.proj_norm(self.proj(visual_tokens.to(self.proj.weight.dtype))).to(embed.weight.dtype)
        b = vis.shape[0]
        before = embed(self.prompt_before_ids).unsqueeze(0).expand(b, -1, -1)
        after = embed(self.prompt_after_ids).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([before, vis, after], dim=1)

    def build_inputs(self, visual_tokens: torch.Tensor | None, reports: list[str],
                     slot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """inputs_embeds / attention_mask / labels for teacher forcing, reports right-padded.

        Layout per row: [bos] prompt-before, T visual, prompt-after, report (truncated to
        max_report_tokens), eos, pads. Labels are -100 except on report tokens and eos.
        """
        n = (slot if slot is not None else visual_tokens).shape[0]
        if len(reports) != n:
            raise ValueError(f"{n} visual inputs but {len(reports)} reports")
        prefix = self._prefix_embeds(visual_tokens, slot)
        b, p, device = prefix.shape[0], prefix.shape[1], prefix.device
        rows = []
        for i, r in enumerate(reports):
            if not isinstance(r, str):
                raise TypeError(f"report {i} is {type(r).__name__}, not str")
            rows.append(_encode(self.tokenizer, r)[:self.max_report_tokens] + [self.eos_id])
        width = max(len(r) for r in rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((b, width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, device=device)
            mask[i, :len(r)] = 1
        report_embeds = self.lm.get_input_embeddings()(ids)
        return {
            "inputs_embeds": torch.cat([prefix, report_embeds], dim=1),
            "attention_mask": torch.cat([torch.ones((b, p), dtype=torch.long, device=device), mask], dim=1),
            "labels": torch.cat([torch.full((b, p), -100, dtype=torch.long, device=device),
                                 ids.masked_fill(mask == 0, -100)], dim=1),
        }

    def forward(self, visual_tokens: torch.Tensor | None, reports: list[str],
                slot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean cross-entropy over the report tokens and eos of the batch; and the logits.
        `slot`: (B, T, hidden) content of the image slot in the LM's embedding space instead of
        projected visual tokens (pre-training a conditioned report LM)."""
        out = self.lm(**self.build_inputs(visual_tokens, reports, slot))
        return {"loss": out.loss, "logits": out.logits}

    def condition_slot(self, phrases: list[list[str]], length: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, length, hidden) image-slot content that states each study's findings in words.

        Each phrase becomes one vector, the mean of its tokens' input embeddings; the phrases
        of a study fill a random number (at least one each) of randomly placed slot positions
        and the image placeholder's embedding fills the rest, so the LM learns to read a
        variable set of vectors anywhere in the slot, as it must read visual tokens later.
        A share of studies (UNCONDITIONED_SHARE) gets filler only. Every position is
        layer-normalised (no affine), the distribution the projection's LayerNorm starts from.
        """
        embed = self.lm.get_input_embeddings()
        device = embed.weight.device
        filler_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if not isinstance(filler_id, int) or filler_id == self.tokenizer.unk_token_id:
            filler_id = self.pad_id
        filler = embed(torch.tensor([filler_id], device=device))[0]
        rows = []
        for study in phrases:
            slot = filler.expand(length, -1).clone()
            keep = bool(study) and float(torch.rand((), generator=generator)) >= UNCONDITIONED_SHARE
            if keep:
                vectors = torch.stack([embed(torch.tensor(_encode(self.tokenizer, p) or [filler_id], device=device)
                                             ).mean(0) for p in study])
                k = len(study)
                n_content = int(torch.randint(min(k, length), length + 1, (), generator=generator))
                where = torch.randperm(length, generator=generator)[:n_content].to(device)
                which = torch.cat([torch.arange(min(k, n_content)),
                                   torch.randint(k, (max(0, n_content - k),), generator=generator)]).to(device)
                slot = slot.index_copy(0, where, vectors[which])
            rows.append(slot)
        slot = torch.stack(rows)
        return torch.nn.functional.layer_norm(slot, slot.shape[-1:])

    @torch.no_grad()
    def generate(self, visual_tokens: torch.Tensor, num_beams: int = 3, min_new_tokens: int | None = None,
                 max_new_tokens: int | None = None, repetition_penalty: float = 2.0, no_repeat_ngram_size: int = 3,
                 length_penalty: float = 1.0, batch_size: int | None = None, guidance: float = 1.0) -> list[str]:
        """Reports for a batch of visual tokens (beam search, deterministic), special tokens stripped.

        Defaults follow the paper (beam 3, repetition penalty 2.0); min/max new tokens come
        from the constructor's decoding budget unless given. `guidance` > 1 contrasts each step
        with the LM under a filler-only image slot (models.guidance.EmptySlotGuidance); 1 is off.
        """
        lo = self.min_new_tokens if min_new_tokens is None else min_new_tokens
        hi = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 0 <= lo <= hi:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens, got {lo} and {hi}")
        n = visual_tokens.shape[0]
        step = batch_size or max(n, 1)
        was_training = self.training
        self.eval()
        texts: list[str] = []
        try:
            guided = float(guidance) != 1.0
            if guided:       # the empty-slot prompt: the same for every study and chunk
                from transformers import LogitsProcessorList

                from cxpmrg_lib.models.guidance import EmptySlotGuidance
                empty = self._prefix_embeds(None, slot=self.condition_slot([[]], visual_tokens.shape[1]))
            starts = range(0, n, step)
            for s in tqdm(starts, desc="generate", unit="batch", disable=len(starts) <= 1):
                embeds = self._prefix_embeds(visual_tokens[s:s + step])
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                # a fresh processor per chunk: it holds the cache of its chunk's empty-slot branch
                extra = ({"logits_processor": LogitsProcessorList([EmptySlotGuidance(self.lm, empty, guidance)])}
                         if guided else {})
                out = self.lm.generate(
                    inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=num_beams,
                    min_new_tokens=lo, max_new_tokens=hi, repetition_penalty=repetition_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty,
                    eos_token_id=self.eos_id, pad_token_id=self.pad_id, bos_token_id=self.bos_id, **extra)
                texts += [t.strip() for t in self.tokenizer.batch_decode(
                    out, skip_special_tokens=True, clean_up_tokenization_spaces=False)]
        finally:
            self.train(was_training)
        return texts

    # -- saving: only what is trained
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters that receive gradients (projection, LayerNorm, LoRA adapters if any)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the trained weights and a config naming the LM; the LM weights are not written."""
        config = {
            "visual_dim": self.visual_dim, "prompt": self.prompt, "freeze_lm": self.freeze_lm,
            "max_report_tokens": self.max_report_tokens, "typical_report_tokens": self.typical_report_tokens,
            "lm": {"name_or_path": getattr(self.lm, "name_or_path", None) or self.lm.config._name_or_path,
                   "model_type": self.lm.config.model_type,
                   "hidden_size": self.lm.get_input_embeddings().embedding_dim,
                   "vocab_size": self.lm.get_input_embeddings().num_embeddings},
        }
        tensors = {n: t.contiguous().cpu() for n, t in self.trainable_state_dict().items()}
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            (tmp / PREFIX_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / PREFIX_WEIGHTS_NAME), metadata={"format": "pt"})
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> "VisualPrefixLM":
        """Rebuild the head saved by save_pretrained around `lm` (the same LM it was trained on)."""
        directory = Path(directory)
        cfg_file, weights_file = directory / PREFIX_CONFIG_NAME, directory / PREFIX_WEIGHTS_NAME
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"no {f.name} in {directory}")
        cfg = json.loads(cfg_file.read_text())
        saved_lm = cfg.pop("lm")
        embed = lm.get_input_embeddings()
        if (embed.embedding_dim, embed.num_embeddings) != (saved_lm["hidden_size"], saved_lm["vocab_size"]):
            raise ValueError(f"{directory} was trained on LM {saved_lm['name_or_path']!r} (hidden "
                             f"{saved_lm['hidden_size']}, vocab {saved_lm['vocab_size']}); the LM given has hidden "
                             f"{embed.embedding_dim}, vocab {embed.num_embeddings}")
        model = cls(lm, tokenizer, **cfg)
        tensors = load_file(str(weights_file))
        params = dict(model.named_parameters())
        expected = set(model.trainable_state_dict())
        if set(tensors) != expected:
            raise ValueError(f"{weights_file} holds {sorted(set(tensors) - expected)[:5]} not trained here and lacks "
                             f"{sorted(expected - set(tensors))[:5]} (a LoRA LM must be wrapped the same way)")
        with torch.no_grad():
            for name, t in tensors.items():
                if t.shape != params[name].shape:
                    raise ValueError(f"{weights_file}: {name} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].copy_(t)
        return model


def _drop_frozen_lm_keys(module: VisualPrefixLM, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in module._frozen_lm_keys:
        state_dict.pop(prefix + key, None)


def _remember_load_prefix(module: VisualPrefixLM, state_dict, prefix: str, *args) -> None:
    module._load_prefix = prefix


def _forgive_missing_lm_keys(module: VisualPrefixLM, incompatible_keys) -> None:
    frozen = {module._load_prefix + k for k in module._frozen_lm_keys}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in frozen]
