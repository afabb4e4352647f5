"""cxpmrg_lib: a reproducible study of chest X-ray report generation."""
__version__ = "0.1.0"
