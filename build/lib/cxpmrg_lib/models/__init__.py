"""Models: the Vision Mamba encoder and its heads, the text side, the benchmark zoo."""
