"""Structured block operators, each a :class:`pylops.LinearOperator` (one per file).

``BlockDiagonal``, ``BlockBidiagonal`` (the paper's ``M``, eqs. 7/14) and its
inverse, ``Shift`` (``P``, eq. 15), ``KronContract`` (``I kron b``: ``DD``,
``DM``), ``BlockTridiagonal`` (pivoted factorisation), ``Partitioned2x2``
(Schur-complement inverse, eqs. 29, 40-43), ``Woodbury`` (eq. 28), and two
helpers of the paper's route: ``Permutation`` and ``BlockSparse``.
"""

from .block_bidiagonal import BlockBidiagonal, BlockBidiagonalInverse
from .block_diagonal import BlockDiagonal
from .block_sparse import BlockSparse
from .block_tridiagonal import BlockTridiagonal, BlockTridiagonalInverse
from .kron_contract import KronContract
from .partitioned import Partitioned2x2, Partitioned2x2Inverse
from .permutation import Permutation
from .shift import Shift
from .woodbury import Woodbury

__all__ = [
    "BlockBidiagonal",
    "BlockBidiagonalInverse",
    "BlockDiagonal",
    "BlockSparse",
    "BlockTridiagonal",
    "BlockTridiagonalInverse",
    "KronContract",
    "Partitioned2x2",
    "Partitioned2x2Inverse",
    "Permutation",
    "Shift",
    "Woodbury",
]
