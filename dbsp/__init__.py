"""dbsp: sparse attention kernels and sparsity-aware sequence parallelism for video diffusion transformers.

Public surface:

* :class:`SparseMask`: which (query block, key tile) pairs are computed; block or fine-grained.
* :func:`sparse_attention`: attention under a ``SparseMask``, dispatched to the fastest backend.
* :func:`reference_attention`: the exact pure-PyTorch oracle every fast path is tested against.
* :func:`predict_mask`, :class:`MaskPredictor`: training-free masks from q and k (block or
  fine-grained), with reuse across denoising steps.
* :func:`make_plan`, :func:`imbalance_ratio`, :func:`choose_degrees`, :class:`Plan`,
  :class:`PlanCache`, :class:`CostModel`: db-SP balancing of heads and blocks over GPUs.
* :func:`make_workload`, :class:`VideoGeometry`: video token geometry and synthetic DiT workloads.
* ``dbsp.dist``: ``SPGroups``, ``sp_attention`` (Ulysses x Ring, applying a Plan).
* ``dbsp.integrations.diffusers``: ``apply`` / ``remove`` on a diffusers video transformer.
"""

from .attention import available_backends, sparse_attention
from .mask import SparseMask
from .plan import CostModel, Plan, PlanCache, WorkSummary, choose_degrees, imbalance_ratio, make_plan, summarize_work
from .predict import MaskPredictor, PredictConfig, predict_mask
from .reference import reference_attention
from .video import VideoGeometry, make_workload

__all__ = [
    "CostModel",
    "MaskPredictor",
    "Plan",
    "PlanCache",
    "PredictConfig",
    "SparseMask",
    "VideoGeometry",
    "WorkSummary",
    "available_backends",
    "choose_degrees",
    "imbalance_ratio",
    "make_plan",
    "make_workload",
    "predict_mask",
    "reference_attention",
    "sparse_attention",
    "summarize_work",
]
__version__ = "0.1.0"
