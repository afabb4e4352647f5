"""The embedded default data: a synthetic CheXpert Plus tree ("phantom") and the real IU X-Ray reports with
radiographs rendered from their MeSH terms ("iu-phantom"). `writer` writes the trees; `spec` says what a
study holds, `render` (with `canvas`, `findings`, `acquire`, `lateral`) draws it and `reports` words it."""
from cxpmrg_lib.data.phantom.writer import (CHEXPERT_PLUS_COLUMNS, DATASET_MARKER, PREVALENCE, Anatomy, Finding,
                                            StudySpec, expected_prevalence, mesh_to_findings, render_lateral,
                                            render_study, sample_anatomy, sample_study_spec, write_iu_phantom,
                                            write_phantom)

__all__ = ["write_phantom", "write_iu_phantom", "render_study", "render_lateral", "sample_study_spec",
           "sample_anatomy", "Finding", "Anatomy", "StudySpec", "PREVALENCE", "expected_prevalence", "DATASET_MARKER",
           "CHEXPERT_PLUS_COLUMNS", "mesh_to_findings"]
