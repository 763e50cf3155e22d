"""The paper's own inverse route (eqs. 25-43, corrected), for study.

:func:`woodbury_inverse` builds ``(H + λI)⁻¹`` by the lifting, ``A``, ``U``,
``Q``, ``S_H``, the Schur complement of eq. 40 and Woodbury's identity
(eq. 28), each a composable operator; :mod:`~blockops.woodbury.blocks` holds
the per-layer blocks and the validity checks. The general exact route is
:mod:`blockops.inverse`.
"""

from .blocks import RouteBlocks, ScalarView, route_blocks, scalar_view
from .route import WoodburyConditionWarning, WoodburyInverse, WoodburyRoute, woodbury_inverse

__all__ = [
    "RouteBlocks",
    "ScalarView",
    "WoodburyConditionWarning",
    "WoodburyInverse",
    "WoodburyRoute",
    "route_blocks",
    "scalar_view",
    "woodbury_inverse",
]
