"""Speed and memory measurements: the selective scan (scan), Vision Mamba against a ViT (encoder),
stage-3 training and generation (report) and the peak-memory probe they share (memory)."""
