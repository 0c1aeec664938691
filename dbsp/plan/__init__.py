"""db-SP planning: the sparse imbalance ratio, head- and block-level balancing, degree choice, reuse.

Pure functions of a mask's ``work()`` and the parallel degrees; no communication. Every rank that
calls them with identical inputs gets the identical :class:`Plan` (integer arithmetic, fixed
tie-breaking), and :meth:`Plan.fingerprint` lets ranks check that cheaply.

The submodules, in reading order; each imports only the ones above it:

* :mod:`dbsp.plan.core`: the :class:`Plan` and :class:`WorkSummary` data types, the planner's
  inputs and their checks, and the ring and tile math (``rho_s``, :func:`tile_work`,
  :func:`imbalance_ratio`, :func:`dense_heads`). Its docstring draws the rank layout.
* :mod:`dbsp.plan.cost`: :class:`CostModel` and :class:`Prediction`, a plan's predicted time, and
  the per-head rates that let the planner balance time rather than tile entries.
* :mod:`dbsp.plan.balance`: :func:`make_plan`: head balancing, block balancing, the candidate
  layouts and the pick among them.
* :mod:`dbsp.plan.degrees`: :func:`choose_degrees` and :func:`score_degrees`, with the lower
  bounds that skip candidates which cannot win.
* :mod:`dbsp.plan.cache`: :class:`PlanCache`, plan reuse across denoising steps with cheap
  checks and repairs.
"""

from .balance import DEFAULT_REWARD, make_plan
from .cache import DEFAULT_REUSE_THRESHOLD, PlanCache
from .core import (DEFAULT_SUMMARY_RING, DEFAULT_SUMMARY_UNITS, Plan, WorkSummary, dense_heads, imbalance_ratio,
                   summarize_work, tile_work)
from .cost import CostModel, Prediction
from .degrees import DegreeChoice, choose_degrees, score_degrees

__all__ = [
    "CostModel",
    "DEFAULT_REUSE_THRESHOLD",
    "DEFAULT_REWARD",
    "DEFAULT_SUMMARY_RING",
    "DEFAULT_SUMMARY_UNITS",
    "DegreeChoice",
    "Plan",
    "PlanCache",
    "Prediction",
    "WorkSummary",
    "choose_degrees",
    "dense_heads",
    "imbalance_ratio",
    "make_plan",
    "score_degrees",
    "summarize_work",
    "tile_work",
]
