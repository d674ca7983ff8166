"""Fused Triton hook kernels, each with an exact PyTorch reference."""
