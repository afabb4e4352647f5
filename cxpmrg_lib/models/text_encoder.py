"""The report side of stage 2 (X-ray/report contrastive learning): a BERT-family text encoder.

The paper trains Bio_ClinicalBERT. Its weights cannot be fetched here (no hub access), so
the encoder either loads a BERT-family checkpoint from a local folder (`pretrained=PATH`)
or builds a small BertModel from scratch with a WordPiece vocabulary trained on the
training reports, so the default CPU run needs nothing downloaded.

A saved encoder is one folder: config.json (the TextEncoderConfig plus the backbone's
transformers config, so it reloads without the original checkpoint), model.safetensors
and tokenizer/ (a transformers tokenizer folder).
"""
from __future__ import annotations

import json
import logging
import os
import string
import tempfile
import unicodedata
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from cxpmrg_lib.util.fileio import atomic_dir

__all__ = ["TextEncoderConfig", "TextEncoder", "train_wordpiece_tokenizer", "SPECIAL_TOKENS", "POOLINGS"]

log = logging.getLogger(__name__)

# DataLoader workers fork after a tokenizer has run; its thread pool cannot survive that (results stay equal).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
POOLINGS = ("cls", "mean")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
_FORMAT = "cxpmrg-text-encoder"


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4000,
                              lowercase: bool = True, min_frequency: int = 2, overwrite: bool = False):
    """Train a BERT-style WordPiece vocabulary on the training reports and save it to `out_dir`.

    Used when no pretrained clinical BERT is at hand: a vocabulary fitted to the reports
    keeps medical words ("cardiomegaly") as one or two pieces instead of many. The
    result is a `transformers.BertTokenizerFast`, written atomically with save_pretrained
    so `AutoTokenizer.from_pretrained(out_dir)` reloads it offline. Same texts, same vocabulary.
    Blank texts are skipped; non-strings (e.g. NaN from pandas) are an error.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    corpus = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__} ({text!r}), not str; "
                            "drop or fill missing reports before training the tokenizer")
        if text.strip():
            corpus.append(text)
    if not corpus:
        raise ValueError("no non-blank texts to train the WordPiece tokenizer on")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the {len(SPECIAL_TOKENS)} special tokens")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, not {min_frequency}")

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # tokenizers' trainer numbers the "##c" pieces in hash-map order, and that order breaks ties
    # between equally frequent merges, so the vocabulary changes from run to run
    # (huggingface/tokenizers#1794). Listing every "##c" up front, sorted, fixes their ids.
    continuations = _continuation_pieces(corpus, normalizer)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[*SPECIAL_TOKENS, *continuations],
                                        continuing_subword_prefix="##", show_progress=False)
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    scratch.normalizer, scratch.pre_tokenizer = normalizer, pre_tokenizer
    scratch.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    # Rebuild on the learnt vocabulary so only the five BERT tokens are special.
    tok = Tokenizer(models.WordPiece(scratch.get_vocab(), unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")

    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, strip_accents=None)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        fast.save_pretrained(str(tmp))
    log.info("trained a WordPiece vocabulary of %d tokens on %d texts -> %s", len(fast), len(corpus), out_dir)
    return fast


def _continuation_pieces(corpus: list[str], normalizer) -> list[str]:
    """Sorted "##c" for every character that can continue a word after BERT normalisation.

    The normaliser works character by character, so normalising each distinct raw character
    is enough (and far faster than normalising the corpus). Whitespace and punctuation
    never continue a word (BertPreTokenizer splits on them).
    """
    chars = set()
    for raw in set("".join(corpus)):
        chars.update(normalizer.normalize_str(raw))
    return sorted("##" + c for c in chars if not c.isspace() and not _is_punctuation(c))


def _is_punctuation(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c).startswith("P")


@dataclass
class TextEncoderConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int | None = None     # None: 4 * hidden
    max_length: int = 128               # tokens per report, [CLS] and [SEP] included
    pooling: str = "mean"               # "mean" over non-pad tokens, or the "cls" token
    dropout: float = 0.1
    pretrained: str | None = None       # local folder of a BERT-family checkpoint (e.g. Bio_ClinicalBERT)

    def __post_init__(self):
        if self.intermediate is None:
            self.intermediate = 4 * self.hidden
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.max_length < 2:
            raise ValueError(f"max_length must hold at least [CLS] and [SEP], not {self.max_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.pretrained is not None:
            self.pretrained = os.fspath(self.pretrained)

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(nn.Module):
    """Reports -> one pooled vector each, from a transformers BERT-family model and its tokenizer."""

    def __init__(self, config: TextEncoderConfig, backbone: nn.Module, tokenizer):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; padding a batch needs one")
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if max_pos is not None and config.max_length > max_pos:
            raise ValueError(f"max_length {config.max_length} exceeds the backbone's "
                             f"max_position_embeddings {max_pos}")
        self.config = config
        self.backbone = _strip_pooler(backbone)
        self.tokenizer = tokenizer

    @property
    def output_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and 0/1 mask -> (B, hidden) pooled features."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Truncate to max_length and right-pad to the longest in the batch; device None: the encoder's."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one str (wrap it: [text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__} ({text!r}), not str")
        if not texts:
            raise ValueError("tokenize got no texts")
        # right padding keeps [CLS] at position 0 (cls pooling) and positions the same as unpadded
        enc = self.tokenizer(texts, truncation=True, max_length=self.config.max_length, padding="longest",
                             padding_side="right", return_tensors="pt", return_token_type_ids=False)
        device = self.device if device is None else device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """tokenize + forward; gradients follow the caller's context (wrap in torch.no_grad to save memory)."""
        return self(**self.tokenize(texts))

    # ------------------------------------------------------------------ building and persistence

    @classmethod
    def build(cls, config: TextEncoderConfig, texts: Iterable[str] | None = None, tokenizer=None,
              tokenizer_dir: str | os.PathLike | None = None, vocab_size: int = 4000) -> "TextEncoder":
        """A local checkpoint with its own tokenizer, or a fresh BertModel on a given or newly trained tokenizer.

        `tokenizer` is a transformers tokenizer or the path of a tokenizer folder. With only
        `texts`, a WordPiece vocabulary is trained on them (saved to `tokenizer_dir` if given).
        """
        if config.pretrained is not None:
            if tokenizer is not None:
                raise ValueError("pass either config.pretrained (which brings its own tokenizer) "
                                 "or tokenizer, not both")
            if texts is not None:
                log.info("config.pretrained is set: using its tokenizer; the given texts are not used")
            return cls._from_checkpoint(config)
        if tokenizer is None:
            if texts is None:
                raise ValueError("TextEncoder.build needs config.pretrained, a tokenizer, or texts to train a "
                                 "WordPiece tokenizer on; none was given")
            if tokenizer_dir is not None:
                tokenizer = train_wordpiece_tokenizer(texts, tokenizer_dir, vocab_size=vocab_size)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    tokenizer = train_wordpiece_tokenizer(texts, Path(tmp) / "tokenizer", vocab_size=vocab_size)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(tokenizer)
        return cls(config, _fresh_bert(config, tokenizer), tokenizer)

    @classmethod
    def _from_checkpoint(cls, config: TextEncoderConfig) -> "TextEncoder":
        from transformers import AutoConfig, AutoModel

        path = Path(config.pretrained).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"pretrained text encoder folder not found: {path}. The Hugging Face hub is not reachable "
                "from here: download the model folder (config.json, weights, tokenizer files) yourself "
                "and pass its local path as pretrained")
        backbone_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(backbone_config, name):
                setattr(backbone_config, name, config.dropout)
        backbone = AutoModel.from_pretrained(str(path), config=backbone_config, local_files_only=True)
        tokenizer = _load_tokenizer(path)
        if len(tokenizer) > backbone.config.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                             f"{backbone.config.vocab_size} embeddings")
        sizes = {"hidden": backbone.config.hidden_size, "layers": backbone.config.num_hidden_layers,
                 "heads": backbone.config.num_attention_heads,
                 "intermediate": getattr(backbone.config, "intermediate_size", config.intermediate)}
        if any(getattr(config, k) != v for k, v in sizes.items()):
            log.info("pretrained %s sets the sizes %s (config values ignored)", path, sizes)
        log.info("loaded text encoder %s (%s, %d tokens)", path, backbone.config.model_type, len(tokenizer))
        return cls(replace(config, **sizes), backbone, tokenizer)

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write config.json, model.safetensors and tokenizer/ into `directory`, as one atomic folder."""
        directory = Path(directory)
        payload = {"format": _FORMAT, "text_encoder": self.config.to_dict(),
                   "backbone": self.backbone.config.to_dict()}
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TextEncoder":
        """Restore a folder written by save_pretrained (needs neither the original checkpoint nor texts)."""
        from transformers import AutoConfig, AutoModel

        directory = Path(directory).expanduser()
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"no saved text encoder at {directory} ({CONFIG_NAME} missing)")
        payload = json.loads(config_file.read_text(encoding="utf-8"))
        if payload.get("format") != _FORMAT:
            hint = (" It looks like a transformers checkpoint: load it with "
                    "TextEncoder.build(TextEncoderConfig(pretrained=PATH))." if "model_type" in payload else "")
            raise ValueError(f"{config_file} is not a saved TextEncoder.{hint}")
        names = {f.name for f in fields(TextEncoderConfig)}
        config = TextEncoderConfig(**{k: v for k, v in payload["text_encoder"].items() if k in names})
        backbone_dict = dict(payload["backbone"])
        backbone_config = AutoConfig.for_model(backbone_dict.pop("model_type"), **backbone_dict)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no weights at {weights}")
        encoder = cls(config, AutoModel.from_config(backbone_config), _load_tokenizer(directory / TOKENIZER_DIR))
        try:
            load_model(encoder, str(weights), strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"weights {weights} do not fit the saved config: {e}") from e
        return encoder


def _fresh_bert(config: TextEncoderConfig, tokenizer) -> nn.Module:
    """A randomly initialised BertModel sized by `config`, its vocabulary by `tokenizer`."""
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(vocab_size=len(tokenizer), hidden_size=config.hidden, num_hidden_layers=config.layers,
                             num_attention_heads=config.heads, intermediate_size=config.intermediate,
                             max_position_embeddings=config.max_length, hidden_dropout_prob=config.dropout,
                             attention_probs_dropout_prob=config.dropout, pad_token_id=tokenizer.pad_token_id)
    return BertModel(bert_config, add_pooling_layer=False)


def _strip_pooler(backbone: nn.Module) -> nn.Module:
    # BERT's tanh pooler is never used (we pool ourselves); unused parameters break DDP and waste memory.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def _load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
