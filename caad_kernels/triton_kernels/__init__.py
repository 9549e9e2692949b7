"""Fused Triton kernels of the contrastive KD loss (one kernel per file)."""
