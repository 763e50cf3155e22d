"""The Hessian of a pipeline as operator algebra (eqs. 24-26), and its exact inverse."""

from .hessian import (
    FusedHessian,
    ggn_vp,
    hessian,
    hvp,
    lifted_hessian,
    literal_ggn,
    literal_hessian,
)
from .kkt import InverseHessian, inverse_hessian
from .parts import HessianParts, Layerwise, hessian_parts, point_structure
from .woodbury import WoodburyRoute, woodbury_inverse

__all__ = [
    "FusedHessian",
    "HessianParts",
    "InverseHessian",
    "Layerwise",
    "WoodburyRoute",
    "ggn_vp",
    "hessian",
    "hessian_parts",
    "hvp",
    "inverse_hessian",
    "lifted_hessian",
    "literal_ggn",
    "literal_hessian",
    "point_structure",
    "woodbury_inverse",
]
