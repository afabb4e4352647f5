"""R2GenCSR-style: context-sample residuals in front of a frozen LM (after Wang et al., "R2GenCSR: Retrieving
Context Samples for Large Language Model based X-ray Medical Report Generation", arXiv 2024).

The mechanism: a Mamba visual encoder and a frozen LLM, where the study's visual tokens reach the LM
together with their residuals against context samples from the training set, studies with findings
and studies without, so that the LM reads what sets this image apart from normal and from abnormal
ones. Here the encoder is MambaXray-VL's stage-2 Vision Mamba, frozen, whose study tokens are computed
once (as for the LM-swap rows), and the LM is MambaXray-VL's frozen report LM; for each study the K
training studies without findings (No Finding) and the K with findings whose pooled tokens are most
similar (cosine) to its own are retrieved, and each image position of the LM's slot holds the study's
token and its residuals against the two contexts side by side, [x, x - mean(normal contexts),
x - mean(abnormal contexts)] (3D features), through the one trained Linear + LayerNorm. R2GenCSR
gives the residuals positions of their own; here the slot keeps the length the frozen LM was trained
to read (the lm-llama row's), since a slot three times as long would put the report at positions
that LM never saw, and the two rows differ by the residuals alone. In training a study is never its
own context. The bank and its normal / abnormal split are the training split's (its labels, never a
test report's). Left out: R2GenCSR's training of the encoder and its prompt text around the contexts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContextResidualLM"]


class ContextResidualLM(nn.Module):
    """`head` (a VisualPrefixLM on a frozen LM, visual width 3D) over context-residual tokens of precomputed
    study tokens.

    `bank`: (N, T, D) training study tokens; `normal`: (N,) bool, True for a study without findings.
    forward(tokens (B, T, D), mask, reports, exclude=None) -> {"loss", ...}; generate(tokens, mask, **decoding);
    `exclude`: (B,) bank rows that must not serve as a study's context (the study itself in training)."""

    def __init__(self, head: nn.Module, bank: torch.Tensor, normal: torch.Tensor, contexts: int = 4):
        super().__init__()
        normal = torch.as_tensor(normal, dtype=torch.bool)
        if bank.ndim != 3 or normal.shape != bank.shape[:1]:
            raise ValueError(f"bank must be (N, T, D) with one normal flag per row, got {tuple(bank.shape)} "
                             f"and {tuple(normal.shape)}")
        if getattr(head, "visual_dim", None) != 3 * bank.shape[-1]:
            raise ValueError(f"the head must read {3 * bank.shape[-1]}-wide tokens (a study token and its two "
                             f"residuals), not {getattr(head, 'visual_dim', None)}")
        for name, group in (("normal", normal), ("abnormal", ~normal)):
            if int(group.sum()) < contexts + 1:
                raise ValueError(f"the context bank has {int(group.sum())} {name} studies; {contexts} contexts "
                                 "need at least one more")
        self.head, self.contexts = head, int(contexts)
        # the bank is data, not weights: rebuilt from the training split, never saved with the model
        self.register_buffer("bank", bank.float(), persistent=False)
        self.register_buffer("bank_keys", F.normalize(bank.float().mean(1), dim=-1), persistent=False)
        self.register_buffer("normal", normal, persistent=False)

    def context(self, tokens: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normal context, abnormal context), each (B, T, D): the mean tokens of the K most similar bank
        studies of each kind."""
        sims = F.normalize(tokens.float().mean(1), dim=-1) @ self.bank_keys.T          # (B, N)
        if exclude is not None:
            sims = sims.scatter(1, exclude.view(-1, 1).to(sims.device), float("-inf"))
        out = []
        for group in (self.normal, ~self.normal):
            idx = sims.masked_fill(~group, float("-inf")).topk(self.contexts, dim=1).indices   # (B, K)
            out.append(self.bank[idx].mean(1).to(tokens.dtype))
        return out[0], out[1]

    def visual_tokens(self, tokens: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, 3D): at each position the study's token, its residual against the normal context and
        against the abnormal one."""
        normal, abnormal = self.context(tokens, exclude)
        return torch.cat([tokens, tokens - normal, tokens - abnormal], dim=-1)

    def forward(self, tokens: torch.Tensor, _mask, reports: list[str], exclude: torch.Tensor | None = None) -> dict:
        return self.head(self.visual_tokens(tokens, exclude), reports)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, _mask=None, **decoding) -> list[str]:
        return self.head.generate(self.visual_tokens(tokens), **decoding)
