"""Triton kernels (private). CPU runs them under ``TRITON_INTERPRET=1`` set before import."""
