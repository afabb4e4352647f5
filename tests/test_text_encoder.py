"""The stage-2 text encoder: WordPiece training, pooling, persistence, local checkpoints."""
from __future__ import annotations

import json
import random

import pytest
import torch

from cxpmrg_lib.models.text_encoder import TextEncoder, TextEncoderConfig, train_wordpiece_tokenizer

FINDINGS = ["cardiomegaly", "pneumothorax", "pleural effusion", "atelectasis", "consolidation", "pulmonary edema",
            "pneumonia", "rib fracture", "lung opacity", "hilar lymphadenopathy"]
PLACES = ["right lower lobe", "left lower lobe", "right upper lobe", "left base", "right base", "lingula"]
SIZES = ["small", "moderate", "large", "mild", "trace"]


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Synthetic radiology sentences, varied enough that merges tie and differ in frequency."""
    rng = random.Random(seed)
    templates = [
        "There is {size} {finding} in the {place}.",
        "No evidence of {finding}.",
        "Stable {finding}, unchanged from the prior study.",
        "The heart size is normal. No {finding} or {finding2}.",
        "{size} {finding} at the {place}, possibly {finding2}.",
        "Interval improvement of the {place} {finding}.",
        "Findings consistent with {finding}; recommend follow-up radiograph.",
    ]
    return [rng.choice(templates).format(size=rng.choice(SIZES), finding=rng.choice(FINDINGS),
                                         finding2=rng.choice(FINDINGS), place=rng.choice(PLACES))
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    train_wordpiece_tokenizer(corpus, out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def _encoder(tokenizer, **kw) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.build(TextEncoderConfig(hidden=32, layers=2, heads=2, max_length=24, **kw),
                             tokenizer=tokenizer).eval()


# ----------------------------------------------------------------------------- tokenizer

def test_wordpiece_keeps_medical_words_in_few_pieces_and_reloads(tokenizer_dir, tokenizer, corpus):
    from transformers import AutoTokenizer, BertTokenizerFast

    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    assert isinstance(tokenizer, BertTokenizerFast)
    for word in ("cardiomegaly", "pneumothorax", "atelectasis", "lymphadenopathy"):
        pieces = tokenizer.tokenize(word)
        assert len(pieces) <= 2, (word, pieces)
    assert len(tokenizer.tokenize("xylophone")) >= 4       # a word never seen is split into many pieces
    assert tokenizer.tokenize("CARDIOMEGALY") == tokenizer.tokenize("cardiomegaly")   # lowercased
    ids = tokenizer("no pneumothorax.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) == 5
    assert tokenizer.unk_token_id not in tokenizer(corpus[:50])["input_ids"][0]
    # ids are contiguous 0..N-1 with the five BERT tokens special and [PAD] = 0
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert tokenizer.pad_token_id == 0
    assert set(tokenizer.all_special_tokens) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    # the reload gives identical ids to a second, independent reload of the same folder
    again = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert again(corpus)["input_ids"] == tokenizer(corpus)["input_ids"]
    assert tokenizer.decode(tokenizer("Stable cardiomegaly.")["input_ids"], skip_special_tokens=True) \
        == "stable cardiomegaly."


def test_wordpiece_training_is_deterministic(tmp_path, corpus):
    # tokenizers' own trainer gives a different vocabulary on most runs of this corpus
    # (huggingface/tokenizers#1794); ours must not.
    files = []
    for i in range(4):
        train_wordpiece_tokenizer(corpus, tmp_path / f"t{i}", vocab_size=150)
        files.append((tmp_path / f"t{i}" / "tokenizer.json").read_bytes())
    assert len(set(files)) == 1
    other = train_wordpiece_tokenizer(_corpus(seed=1), tmp_path / "other", vocab_size=150)
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() != files[0]
    assert len(other) == 150


def test_wordpiece_rejects_bad_input_and_keeps_existing_folder(tmp_path):
    with pytest.raises(ValueError, match="no non-blank texts"):
        train_wordpiece_tokenizer([], tmp_path / "a")
    with pytest.raises(ValueError, match="no non-blank texts"):
        train_wordpiece_tokenizer(["", "   "], tmp_path / "a")
    with pytest.raises(TypeError, match=r"texts\[1\] is float"):
        train_wordpiece_tokenizer(["ok", float("nan")], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError):
        train_wordpiece_tokenizer(["no pneumothorax"] * 3, keep)
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]


# ----------------------------------------------------------------------------- config

def test_config_defaults_and_validation():
    cfg = TextEncoderConfig(hidden=64)
    assert cfg.intermediate == 256 and cfg.pooling == "mean" and cfg.pretrained is None
    assert TextEncoderConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="multiple of heads"):
        TextEncoderConfig(hidden=30, heads=4)


# ----------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_pooled_vector(tokenizer, pooling):
    enc = _encoder(tokenizer, pooling=pooling)
    assert enc.output_dim == 32
    with torch.no_grad():
        alone = enc.encode(["a b c"])
        batch = enc.encode(["a b c", "moderate pleural effusion at the right base, possibly atelectasis."])
    assert alone.shape == (1, 32) and batch.shape == (2, 32)
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_tokenize_pads_right_and_truncates(tokenizer):
    enc = _encoder(tokenizer)
    batch = enc.tokenize(["no pneumothorax.", "stable cardiomegaly " * 40])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 24) and mask.shape == (2, 24) and ids.dtype == torch.long
    assert mask[0].tolist() == [1] * 5 + [0] * 19
    assert (ids[0, 5:] == tokenizer.pad_token_id).all()
    assert ids[1, -1].item() == tokenizer.sep_token_id and mask[1].all()
    with pytest.raises(TypeError, match="list of texts"):
        enc.tokenize("no pneumothorax")


def test_mean_pooling_is_masked_mean_of_hidden_states(tokenizer):
    enc = _encoder(tokenizer)
    batch = enc.tokenize(["no pneumothorax.", "small left pleural effusion."])
    with torch.no_grad():
        hidden = enc.backbone(**batch).last_hidden_state
        pooled = enc(**batch)
    n = int(batch["attention_mask"][0].sum())
    assert torch.allclose(pooled[0], hidden[0, :n].mean(0), atol=1e-6)
    assert not torch.allclose(pooled[0], hidden[0].mean(0), atol=1e-4)   # pads would change it


def test_encoder_trains(tokenizer):
    enc = _encoder(tokenizer).train()
    enc.encode(["no pneumothorax.", "stable cardiomegaly."]).pow(2).sum().backward()
    grad = enc.backbone.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())    # no unused (pooler) parameters, DDP-safe


def test_build_trains_tokenizer_from_texts_and_round_trips(tmp_path, corpus):
    torch.manual_seed(0)
    cfg = TextEncoderConfig(hidden=32, layers=1, heads=2, max_length=32)
    enc = TextEncoder.build(cfg, texts=corpus, tokenizer_dir=tmp_path / "tok").eval()
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert enc.backbone.config.vocab_size == len(enc.tokenizer)
    assert enc.backbone.config.pad_token_id == enc.tokenizer.pad_token_id
    out = enc.save_pretrained(tmp_path / "enc")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer"}
    assert json.loads((out / "config.json").read_text())["text_encoder"] == cfg.to_dict()
    back = TextEncoder.from_pretrained(out).eval()
    assert back.config == cfg
    texts = corpus[:6]
    with torch.no_grad():
        assert torch.equal(enc.encode(texts), back.encode(texts))
    assert back.tokenize(texts)["input_ids"].tolist() == enc.tokenize(texts)["input_ids"].tolist()
    with pytest.raises(FileExistsError):
        enc.save_pretrained(out)
    enc.save_pretrained(out, overwrite=True)
    # without tokenizer_dir the tokenizer lives in memory and is saved with the encoder
    TextEncoder.build(cfg, texts=corpus).save_pretrained(tmp_path / "enc2")
    assert (tmp_path / "enc2" / "tokenizer" / "vocab.txt").is_file()


def test_local_pretrained_checkpoint(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    ckpt = tmp_path / "tiny-clinical-bert"
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=3, intermediate_size=96, max_position_embeddings=64)).eval()
    bert.save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))

    enc = TextEncoder.build(TextEncoderConfig(pretrained=str(ckpt), max_length=32), texts=["ignored"]).eval()
    assert enc.output_dim == 48 and (enc.config.hidden, enc.config.layers, enc.config.heads) == (48, 2, 3)
    assert not any(k.startswith("backbone.pooler") for k in enc.state_dict())
    batch = enc.tokenize(["no pneumothorax.", "stable cardiomegaly at the left base."])
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(enc(**batch), (ref * mask).sum(1) / mask.sum(1), atol=1e-5)   # its weights, not random
        before = enc.encode(["no pneumothorax."])
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        TextEncoder.build(TextEncoderConfig(pretrained=str(ckpt), max_length=128))
    # the saved encoder reloads without the original checkpoint folder
    enc.save_pretrained(tmp_path / "enc")
    for p in ckpt.iterdir():
        p.unlink()
    ckpt.rmdir()
    with torch.no_grad():
        assert torch.equal(TextEncoder.from_pretrained(tmp_path / "enc").eval().encode(["no pneumothorax."]), before)

    with pytest.raises(ValueError, match="not both"):
        TextEncoder.build(TextEncoderConfig(pretrained=str(tmp_path / "x")), tokenizer=tokenizer)


def test_errors_name_the_problem(tmp_path, tokenizer):
    missing = tmp_path / "Bio_ClinicalBERT"
    with pytest.raises(FileNotFoundError) as err:
        TextEncoder.build(TextEncoderConfig(pretrained=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and "hub is not reachable" in msg and "download the model folder" in msg
    with pytest.raises(ValueError, match="none was given"):
        TextEncoder.build(TextEncoderConfig())
    with pytest.raises(FileNotFoundError, match="no saved text encoder"):
        TextEncoder.from_pretrained(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="TextEncoderConfig\\(pretrained=PATH\\)"):
        TextEncoder.from_pretrained(hf)
