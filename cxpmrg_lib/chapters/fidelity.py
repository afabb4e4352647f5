"""How close this study's MambaXray-VL is to the released code, part by part (the stage-3 chapter's table).

Three columns per part: what the released code does (PAPER.md, "The released code"), what the study's tiny
preset trains, and what `EncoderConfig(arch="released")` with `models.released` / `models.released_report`
(the released option) does here; a fourth says why a difference remains. The tiny preset's sizes are read
from `presets.py`, the released decoding from `models.released_report`, so the table follows the code.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["released_fidelity", "FIDELITY_COLUMNS"]

FIDELITY_COLUMNS = ("part", "released code", "this study's tiny preset",
                    'the released option here (`arch="released"`)', "why any difference remains")


def _decoding(d: dict) -> str:
    return (f"beam {d['num_beams']}, {d['min_new_tokens']}-{d['max_new_tokens']} new tokens, "
            f"repetition and length penalty {d['repetition_penalty']:.1f}")


def released_fidelity() -> pd.DataFrame:
    """One row per part of MambaXray-VL (FIDELITY_COLUMNS); short cells, facts only."""
    from cxpmrg_lib.models.released_report import IU_DECODING, RELEASED_DECODING
    from cxpmrg_lib.presets import get_preset, released_encoder

    tiny = get_preset("tiny")
    enc, arm = tiny.encoder, tiny.arm
    base = released_encoder("base", stage=2)
    grid1 = 192 // 16
    clusters_tiny = (enc.grid // arm.cluster) ** 2
    lm = tiny.report_lm
    rows = [
        ("block norms", "LayerNorm with bias (norm1, norm2, final norm_f)",
         "RMSNorm (norm1, norm2, final norm)", "LayerNorm with bias, as released",
         "The paper's text says RMSNorm; the released weights need LayerNorm."),
        ("class token", "One token in the middle of the patch sequence (index M//2), stages 2-3",
         "None; the image vector is the mean of the tokens", "At M//2, as released",
         "Stage 3 reads every token and stage 2 mean-pools; neither needs one."),
        ("position embedding", "Learned over 1+M tokens (stages 2-3); fixed sin-cos at stage 1",
         "Fixed 2D sin-cos, rows first, every stage", "Learned (stages 2-3); sin-cos, columns first (stage 1)",
         "A design choice of the study; not compared with the learned one."),
        ("input", "224 px RGB, bicubic resize, Swin (ImageNet) mean and std",
         f"{enc.image_size} px grey, scaled to [-1, 1]",
         f"{base.image_size} px RGB, bicubic, Swin mean and std (`released_pixels`)",
         f"The X-rays are grey; {enc.image_size} px keeps the tiny preset within a CPU budget."),
        ("patch embedding", "One 16x16 linear projection",
         f"Conv stem (4x4, then 2x2 convolutions), patch {enc.patch_size}", "One linear projection, as released",
         "In a findings probe the stem raised validation AUROC from 0.687 to 0.741 (presets.py)."),
        ("width and depth", f"Base {base.dim} x {base.depth}, Large 1024 x 24",
         f"{enc.dim} x {enc.depth}", "Read from the checkpoint's shapes (Base and Large)",
         "CPU budget; the base and large presets have the paper's sizes."),
        ("MLP", f"SwiGLU w3(silu(w1 x) * w2 x), biased, hidden {base.mlp_width} (Base)",
         f"The same SwiGLU, w1 and w2 stacked in one biased fc1, hidden {enc.mlp_width}",
         "w1, w2, w3 as released", "The same function; the study's width is rounded to a multiple of 8."),
        ("scan directions", "Rows forward and backward, columns forward and backward (v3); "
         "column scans keep the class token in place",
         "The same four; the column scans transpose the whole grid", "The four released ones, class token held",
         "Without a class token there is nothing to hold in place."),
        ("merging the directions", "out_proj of the mean of the four gated scans",
         "out_proj of the mean of the four gated scans", "The same", "None."),
        ("stage-1 layout", f"192 px, {grid1}x{grid1} grid, 9 clusters of 4x4, one direction; "
         "decoder 4 blocks of width 512",
         f"{enc.image_size} px, {enc.grid}x{enc.grid} grid, {clusters_tiny} clusters, one direction; "
         f"decoder width {arm.decoder_dim}",
         "A released stage-1 file read as an encoder; `stage1_to_stage2` as released",
         "CPU budget; the same cluster order and block-causal decoder."),
        ("checkpoint formats", "Pickled .pth: stage 1 {model, optimizer, ...}, stages 2-3 {model, config, ...}",
         "Run folders: safetensors weights and config.json",
         "Reads all three released files (`load_encoder`); writes stages 2-3 (`export_released`)",
         "Safetensors load without running pickled code."),
        ("stage-3 projection", "All 1+M tokens, views averaged, then Linear (llama_proj) and LayerNorm",
         "All M tokens, views averaged, then Linear and LayerNorm", "llama_proj and layer_norm, as released",
         "Only the class token differs."),
        ("stage-3 prompt", "Human: <Img><ImageHere></Img> Generate a ... report ... \\nAssistant:, after BOS",
         "The same prompt after BOS", "The same", "None."),
        ("stage-3 LLM", "Llama-2-7b-chat frozen in float16 (Qwen1.5-1.8B-Chat for IU X-Ray)",
         f"A {lm.num_layers}-layer, {lm.hidden_size}-wide LM trained on the training reports, then frozen",
         "Any local causal LM folder, frozen; float16 on a GPU, float32 on the CPU",
         "A 7B LLM is beyond the CPU budget."),
        ("decoding", f"{_decoding(RELEASED_DECODING)}; IU X-Ray beam {IU_DECODING['num_beams']}, "
         f"{IU_DECODING['min_new_tokens']}-{IU_DECODING['max_new_tokens']} new tokens",
         "Chosen on validation: greedy or beam 3, repetition penalty 1.0, 1.3 or 2.0, no-repeat 3-grams",
         "The released settings (`cxpmrg evaluate-released --profile`)",
         "The study's protocol lets every generator choose its decoding on validation."),
    ]
    return pd.DataFrame(rows, columns=list(FIDELITY_COLUMNS)).set_index("part")
