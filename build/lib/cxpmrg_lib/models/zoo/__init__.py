"""The benchmark's report-generation systems, written here and scaled to the preset (see bench.py).

Every system has ReportModel's two calls: `forward(images, image_mask, reports) -> {"loss"}` and
`generate(images, image_mask, **decoding) -> list[str]`; `common.py` holds what they share.
"""
