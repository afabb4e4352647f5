"""What the book needs on top of the library: the pipeline that runs the notebooks and builds the book
(pipeline), where a chapter's log goes (chapter_log), figures (viz), the efficiency chapter (efficiency),
the report explorer (explore), what may be published (publish), the reproducibility chapter
(reproducibility), the training diagnostics (diagnostics) and the released code beside this study's
model (fidelity). Nothing below this package imports it."""
