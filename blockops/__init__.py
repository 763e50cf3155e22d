"""blockops: matrix-free block operators for the Hessian of layered pipelines.

The Hessian ``H`` of a pipeline ``z_l = f_l(z_{l-1}; x_l)`` and its exact
inverse are composable :class:`pylops.LinearOperator` objects built from the
named pieces of eq. 24 of Rahimi (2025); see ``DESIGN.md`` and the docs.
"""

from . import backend
from ._checks import SingularBlockError

__version__ = "0.1.0"

__all__ = ["SingularBlockError", "__version__", "backend"]
