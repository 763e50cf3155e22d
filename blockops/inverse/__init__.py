"""The exact inverse ``(H + λI)⁻¹`` of a pipeline's Hessian (or Gauss-Newton matrix).

:func:`inverse_hessian` / :class:`InverseHessian` factor once and solve many
right-hand sides with refinement and a residual certificate. The
factorisations (:mod:`~blockops.inverse.factorization`) are the stagewise
sweep (:mod:`~blockops.inverse.stagewise`) and the pivoted banded KKT LU
(:mod:`~blockops.inverse.banded_kkt`). Selected inversion
(:mod:`~blockops.inverse.selected`) reads the diagonal and diagonal blocks
of the inverse off the stagewise factorisation.
"""

from .banded_kkt import BandedKKT
from .factorization import Factorization, plan
from .operator import InverseHessian, inverse_hessian
from .selected import inverse_diagonal, inverse_diagonal_blocks
from .stagewise import ExplicitStage, StagewiseFactor, stages_from_point

__all__ = [
    "BandedKKT",
    "ExplicitStage",
    "Factorization",
    "InverseHessian",
    "StagewiseFactor",
    "inverse_diagonal",
    "inverse_diagonal_blocks",
    "inverse_hessian",
    "plan",
    "stages_from_point",
]
