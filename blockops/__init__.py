"""blockops: matrix-free block operators for the Hessian of layered pipelines.

The Hessian ``H`` of a pipeline ``z_l = f_l(z_{l-1}; x_l)`` and its exact
inverse are composable :class:`pylops.LinearOperator` objects built from the
named pieces of eq. 24 of Rahimi (2025); see the docs' derivation page.

>>> import blockops as bo
>>> net = bo.Pipeline([bo.Dense(3, 8), bo.Dense(8, 2, "identity"), bo.MSELoss()])

The rooms: :mod:`blockops.hessian` (``H`` as operators; the factory is
``blockops.hessian.hessian(point, damping=..., form=..., kind=...)``),
:mod:`blockops.inverse` (the exact ``(H + λI)⁻¹``), :mod:`blockops.woodbury`
(the paper's route), :mod:`blockops.network` (layers and the ``Layer``
contract), :mod:`blockops.operators` and :mod:`blockops.backend`.
"""

from . import backend, operators, solvers
from .hessian import FusedHessian, hessian_parts, hvp, literal_hessian
from .influence import InfluenceScores, influence_scores, per_sample_gradients
from .inverse import InverseHessian, inverse_hessian
from .laplace import LaplaceGGN
from .network import (
    AuxiliaryScalarLoss,
    Bias,
    CustomLoss,
    Dense,
    Elementwise,
    Layer,
    MSELoss,
    Pipeline,
    Point,
    Residual,
    Scale,
    SoftmaxCrossEntropy,
    activation,
)
from .singular import SingularBlockError
from .woodbury import woodbury_inverse

__version__ = "0.1.0"

__all__ = [
    "AuxiliaryScalarLoss",
    "Bias",
    "CustomLoss",
    "Dense",
    "Elementwise",
    "FusedHessian",
    "InfluenceScores",
    "InverseHessian",
    "LaplaceGGN",
    "Layer",
    "MSELoss",
    "Pipeline",
    "Point",
    "Residual",
    "Scale",
    "SingularBlockError",
    "SoftmaxCrossEntropy",
    "__version__",
    "activation",
    "backend",
    "hessian_parts",
    "hvp",
    "influence_scores",
    "inverse_hessian",
    "literal_hessian",
    "operators",
    "per_sample_gradients",
    "solvers",
    "woodbury_inverse",
]
