"""CvT2DistilGPT2-style (Nicolson et al., 2023), scaled down: a convolutional-token vision transformer
whose tokens a GPT-2 decoder reads through cross-attention.

The original warm-starts both halves (CvT-21 from ImageNet, DistilGPT2 from web text) and fine-tunes
everything. Here the decoder is warm-started from a GPT-2 of the tiny size trained as a language model on
the training reports (the LM swap's GPT-2), its cross-attention layers start at random, and the encoder
(convolutional token embedding from a small ResNet, then transformer layers, as in CvT) starts from
scratch. Unlike the frozen-LM systems, the whole decoder is trained.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from cxpmrg_lib.models.report_lm import lm_batch, median_report_tokens, with_causal_lm_loss
from cxpmrg_lib.models.zoo.common import ConvTokenViT, pool_views

log = logging.getLogger(__name__)


class CvT2GPT2(nn.Module):
    """Images -> ConvTokenViT tokens (averaged over a study's views) -> GPT-2 with cross-attention."""

    def __init__(self, lm_dir: str | Path, train_reports: list[str], max_report_tokens: int = 128,
                 encoder_depth: int = 2):
        super().__init__()
        from transformers import AutoTokenizer, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        self.tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
        # the cross-attention layers are new by design: transformers' block listing each of them as "newly
        # initialized ... You should probably TRAIN this model" is silenced for this one load, and said once here.
        # (A quiet modeling_utils makes transformers check the tensor-parallel plan, which then lists every layer
        # as "not sharded": nothing is sharded on purpose, so that logger is quiet for the load too.)
        loggers = [hf_logging.get_logger(name) for name in ("transformers.modeling_utils",
                                                            "transformers.integrations.tensor_parallel")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(hf_logging.ERROR)
        try:
            self.decoder = GPT2LMHeadModel.from_pretrained(str(lm_dir), add_cross_attention=True)
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        with_causal_lm_loss(self.decoder)
        log.info("CvT2DistilGPT2-style: GPT-2 decoder from %s; its %d cross-attention layers start at random "
                 "(trained with the rest)", lm_dir, self.decoder.config.n_layer)
        config = self.decoder.config
        if config.model_type != "gpt2":
            raise ValueError(f"{lm_dir} holds a {config.model_type} model; CvT2GPT2 warm-starts from a GPT-2")
        self.encoder = ConvTokenViT(config.n_embd, depth=encoder_depth, heads=config.n_head)
        self.max_report_tokens = min(max_report_tokens, config.n_positions - 2)
        self.typical_tokens = median_report_tokens(self.tokenizer, train_reports)
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        return pool_views(self.encoder, images, image_mask)

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor | None, reports: list[str]) -> dict:
        batch = {k: v.to(images.device) for k, v in
                 lm_batch(self.tokenizer, reports, self.max_report_tokens + 2).items()}
        out = self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           encoder_hidden_states=self.encode(images, image_mask), labels=batch["labels"])
        return {"loss": out.loss}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, image_mask: torch.Tensor | None = None, num_beams: int = 3,
                 max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, length_penalty: float = 1.0,
                 **_ignored) -> list[str]:
        """Beam search from bos; lengths default to 0.5x-1.5x the typical training report (as for the others)."""
        hi = max_new_tokens if max_new_tokens is not None else min(math.ceil(1.5 * self.typical_tokens),
                                                                   self.max_report_tokens + 1)
        lo = min(min_new_tokens if min_new_tokens is not None else max(1, round(0.5 * self.typical_tokens)), hi)
        was = self.training
        self.eval()
        try:
            memory = self.encode(images, image_mask)
            start = torch.full((images.shape[0], 1), self.bos_id, dtype=torch.long, device=images.device)
            out = self.decoder.generate(
                input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=memory,
                do_sample=False, num_beams=num_beams, min_new_tokens=lo, max_new_tokens=hi,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                length_penalty=length_penalty, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                bos_token_id=self.bos_id)
            return [t.strip() for t in self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True,
                                                                    clean_up_tokenization_spaces=False)]
        finally:
            self.train(was)
