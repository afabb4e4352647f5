"""Optional CheXbert backend for `label_reports`, for users who have the checkpoint.

CheXbert (Smit et al. 2020) is BERT-base with 14 linear heads on the [CLS] state:
13 heads with 4 classes (blank, positive, negative, uncertain) and a No Finding head
with 2 (blank, positive). Its weights are not redistributable and need a form, so
nothing here downloads: the user passes the .pth checkpoint and a local
bert-base-uncased tokenizer folder. The architecture is built from a bert-base-uncased
config created locally, so no hub access is needed either.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxpmrg_lib.data.observations import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

log = logging.getLogger(__name__)

__all__ = ["ChexbertModel", "build_chexbert", "load_chexbert", "classes_to_labels", "label_reports_chexbert"]

# class index -> label value, per head kind
_FOUR = {0: np.nan, 1: POSITIVE, 2: NEGATIVE, 3: UNCERTAIN}
_TWO = {0: np.nan, 1: POSITIVE}


def _bert_base_config(**overrides):
    from transformers import BertConfig
    cfg = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    cfg.update(overrides)
    return BertConfig(**cfg)


def build_chexbert(**config_overrides):
    """An untrained CheXbert-shaped model (BERT + 13 four-way heads + one two-way head)."""
    import torch.nn as nn
    from transformers import BertModel

    class ChexbertModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=True)
            self.dropout = nn.Dropout(0.1)
            hs = config.hidden_size
            self.linear_heads = nn.ModuleList([nn.Linear(hs, 4) for _ in range(13)] + [nn.Linear(hs, 2)])

        def forward(self, input_ids, attention_mask):
            cls = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0][:, 0, :]
            cls = self.dropout(cls)
            return [head(cls) for head in self.linear_heads]

    globals()["ChexbertModel"] = ChexbertModel
    return ChexbertModel(_bert_base_config(**config_overrides))


ChexbertModel = None  # defined on first build (keeps torch/transformers imports lazy)


def load_chexbert(checkpoint: str | os.PathLike, device: str = "cpu"):
    """CheXbert model with the weights of `checkpoint` (a .pth with model_state_dict or a state dict)."""
    import torch
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CheXbert checkpoint not found: {path}. The weights are not shipped or downloaded by this "
            "library: request chexbert.pth from the CheXbert authors (Stanford AIMI) and pass its path as "
            "label_reports(texts, backend='chexbert', checkpoint=PATH, tokenizer=BERT_TOKENIZER_DIR), or use "
            "the default backend='rules'.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a CheXbert checkpoint (expected a state dict, got {type(state).__name__})")
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    model = build_chexbert()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the CheXbert layout; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def classes_to_labels(class_indices) -> pd.DataFrame:
    """Per-head argmax class indices (n x 14) -> DataFrame of label values in CHEXPERT_LABELS order."""
    arr = np.asarray(class_indices)
    if arr.ndim != 2 or arr.shape[1] != len(CHEXPERT_LABELS):
        raise ValueError(f"expected an (n, 14) array of class indices, got shape {arr.shape}")
    out = np.empty(arr.shape, dtype=float)
    for j in range(arr.shape[1]):
        table = _TWO if j == 13 else _FOUR
        try:
            out[:, j] = [table[int(c)] for c in arr[:, j]]
        except KeyError as e:
            raise ValueError(f"class index {e.args[0]} out of range for head {CHEXPERT_LABELS[j]!r}") from None
    return pd.DataFrame(out, columns=list(CHEXPERT_LABELS))


def _clean(text) -> str:
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    return re.sub(r"\s+", " ", str(text)).strip()


def predict_classes(model, tokenizer, texts: list[str], batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Argmax class index of every head for every text (n x 14); blank text -> all class 0."""
    import torch
    out = np.zeros((len(texts), len(CHEXPERT_LABELS)), dtype=np.int64)
    idx = [i for i, t in enumerate(texts) if t]
    with torch.inference_mode():
        for b in range(0, len(idx), batch_size):
            ids = idx[b:b + batch_size]
            enc = tokenizer([texts[i] for i in ids], padding=True, truncation=True, max_length=512, return_tensors="pt")
            logits = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out[ids] = torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu().numpy()
    return out


def label_reports_chexbert(texts, checkpoint=None, tokenizer=None, batch_size: int = 16, device: str = "cpu") -> pd.DataFrame:
    """label_reports with a local CheXbert checkpoint and a local BERT tokenizer folder."""
    if checkpoint is None:
        raise ValueError("backend='chexbert' needs checkpoint=PATH to a local chexbert.pth")
    model = load_chexbert(checkpoint, device=device)
    if tokenizer is None:
        raise ValueError("backend='chexbert' needs tokenizer=PATH to a local bert-base-uncased tokenizer folder")
    if isinstance(tokenizer, (str, os.PathLike)):
        tok_path = Path(tokenizer).expanduser()
        if not tok_path.exists():
            raise FileNotFoundError(f"BERT tokenizer folder not found: {tok_path}")
        from transformers import BertTokenizerFast
        tokenizer = BertTokenizerFast.from_pretrained(str(tok_path), local_files_only=True)
    cleaned = [_clean(t) for t in texts]
    df = classes_to_labels(predict_classes(model, tokenizer, cleaned, batch_size=batch_size, device=device))
    df.loc[[i for i, t in enumerate(cleaned) if not t], :] = np.nan
    return df
