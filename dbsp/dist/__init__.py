"""Sequence-parallel sparse attention: Ulysses, sparsity-aware Ring, and hybrid USP applying db-SP plans.

Public surface:

* :class:`SPGroups`: the Ulysses and Ring process groups of one ``U x R`` layout.
* :func:`sp_attention`: hybrid attention over ``U x R`` ranks, balanced by an optional Plan.
* :func:`ulysses_attention` (``R = 1``) and :func:`ring_attention` (``U = 1``).
* :func:`predict_mask_sharded`: ``dbsp.predict.predict_mask`` from sequence shards, the same global
  mask on every rank.
* :func:`all_to_all`, :func:`ring_pass`, :func:`merge_attention` (and in place,
  :func:`merge_attention_`): the communication primitives.
"""

from .comm import all_to_all, merge_attention, merge_attention_, ring_pass
from .groups import SPGroups
from .predict import predict_mask_sharded
from .ring import ring_attention
from .ulysses import ulysses_attention
from .usp import sp_attention

__all__ = [
    "SPGroups",
    "all_to_all",
    "merge_attention",
    "merge_attention_",
    "predict_mask_sharded",
    "ring_attention",
    "ring_pass",
    "sp_attention",
    "ulysses_attention",
]
