"""Triton kernels, each beside a pure-torch reference with the same signature."""
