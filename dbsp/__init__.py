"""dbsp: sparse attention kernels and sparsity-aware sequence parallelism for video diffusion transformers.

Public surface:

* :class:`SparseMask`: which (query block, key tile) pairs are computed; block or fine-grained.
* :func:`sparse_attention`: attention under a ``SparseMask``, dispatched to the fastest backend.
* :func:`reference_attention`: the exact pure-PyTorch oracle every fast path is tested against.
"""

from .attention import available_backends, sparse_attention
from .mask import SparseMask
from .reference import reference_attention

__all__ = ["SparseMask", "available_backends", "reference_attention", "sparse_attention"]
__version__ = "0.1.0"
