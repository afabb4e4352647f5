"""Leaves with no domain code: atomic files (fileio), run-folder locks (runlock), progress bars
(progress), worker processes (parallel) and the error types (errors). They import nothing else of
cxpmrg_lib."""
