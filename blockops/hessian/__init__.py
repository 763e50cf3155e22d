"""The Hessian of a pipeline as operators: the named pieces of eq. 24, the literal
eq. 24 / eq. 26 forms, and the fused HVP and Gauss-Newton products.

The exact inverse lives in :mod:`blockops.inverse`, the paper's own inverse
route in :mod:`blockops.woodbury`.
"""

import warnings

from .forms import FORMS, hessian, lifted_hessian, literal_ggn, literal_hessian
from .fused import FusedHessian, ggn_vp, hvp
from .parts import HessianParts, Layerwise, hessian_parts, point_structure

__all__ = [
    "FORMS",
    "FusedHessian",
    "HessianParts",
    "Layerwise",
    "ggn_vp",
    "hessian",
    "hessian_parts",
    "hvp",
    "lifted_hessian",
    "literal_ggn",
    "literal_hessian",
    "point_structure",
]

_MOVED = {
    "InverseHessian": "blockops.inverse",
    "inverse_hessian": "blockops.inverse",
    "WoodburyRoute": "blockops.woodbury",
    "woodbury_inverse": "blockops.woodbury",
}


def __getattr__(name):
    """The inverse routes moved out of this package; their old names still resolve."""
    if name in _MOVED:
        import importlib

        warnings.warn(
            f"blockops.hessian.{name} moved to {_MOVED[name]}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'blockops.hessian' has no attribute {name!r}")
