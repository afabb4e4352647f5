"""The benchmark's report-generation systems, written here and scaled to the preset (see cxpmrg_lib.bench).

Every system has ReportModel's two calls: `forward(images, image_mask, reports) -> {"loss"}` and
`generate(images, image_mask, **decoding) -> list[str]`; `common.py` holds what they share.
"""
