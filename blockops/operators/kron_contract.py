r"""Contraction with a row :math:`b`: :math:`I_n \otimes b`, the paper's ``DD`` / ``DM``."""

from __future__ import annotations

import numpy as np

from .._checks import check_dtype, result_dtype
from ._common import BlockOperator, backend_of, check_runs_finite

__all__ = ["KronContract"]


class KronContract(BlockOperator):
    r"""Block-diagonal over layers of :math:`I_{n_l} \otimes b_l` (``DD``, ``DM`` of eq. 24).

    Block ``l`` maps :math:`\mathbb{R}^{n_l m_l} \to \mathbb{R}^{n_l}`. With
    the paper's **column-major** :math:`\mathrm{vec}`, for :math:`X` of shape
    :math:`(m_l, n_l)`

    .. math::
        (I_{n_l} \otimes b_l)\,\mathrm{vec}(X) = (b_l X)^T,
        \qquad
        (I_{n_l} \otimes b_l)^T y = \mathrm{vec}(b_l^T y^T) = y \otimes b_l^T ,

    i.e. each of the :math:`n_l` consecutive length-:math:`m_l` slices of
    the input is contracted with :math:`b_l`. In NumPy's row-major terms the
    flat input of block ``l`` reshapes as ``(n_l, m_l)`` (that is
    :math:`X^T`) and the output is ``that @ b_l``; a tensor stored row-major as
    ``(m_l, n_l)`` (``X.ravel()``) is contracted by :math:`b_l \otimes I_{n_l}`
    instead: ``(b kron I) X.ravel() == (I kron b) X.T.ravel() == b @ X``.

    Parameters
    ----------
    bs : list or array
        ``bs[l]`` is a row :math:`b_l` of shape ``(m_l,)``, or ``(G, m_l)``
        meaning :math:`\mathrm{blockdiag}_g (I_{n_l} \otimes b_{l,g})` with the
        input laid out group-major (group ``g``'s :math:`\mathrm{vec}(X_g)`
        contiguous; the per-sample ``b`` of ``DM``). A 2-D array ``(L, m)`` or
        3-D array ``(L, G, m)`` stacks equal layers: one ``einsum`` in all.
    n : int or list of int
        :math:`n_l` for every layer (an int: the same for all).
    name : str, optional
        Name used in error messages.

    Notes
    -----
    Consecutive layers with equal :math:`(n_l, m_l)` are merged into one
    ``einsum`` (their groups are contiguous), so ragged inputs cost one call
    per run of equal shapes, not per layer.
    """

    def __init__(self, bs, n, name: str = "KronContract"):
        self.name = name
        if hasattr(bs, "ndim"):
            if bs.ndim not in (2, 3):
                raise ValueError(
                    f"{name}: bs has shape {tuple(bs.shape)}; expected a list of (m,) / (G, m) "
                    "rows, or a stack (L, m) / (L, G, m)"
                )
            bs = [bs[i] for i in range(bs.shape[0])]
        bs = list(bs)
        L = len(bs)
        if L == 0:
            raise ValueError(f"{name}: needs at least one layer")
        self.xp = xp = backend_of(name, bs)
        ns = [n] * L if np.ndim(n) == 0 else list(n)
        if len(ns) != L or any(int(v) != v or v < 0 for v in ns):
            raise ValueError(f"{name}: n = {n!r}; expected an int >= 0 or {L} of them")
        b2 = []
        for l, b in enumerate(bs):
            if not hasattr(b, "ndim") or b.ndim not in (1, 2):
                raise ValueError(
                    f"{name}: bs[{l}] has shape {getattr(b, 'shape', None)}; "
                    "expected (m,) or (G, m)"
                )
            check_dtype(name, f"bs[{l}]", b)
            b2.append(b[None] if b.ndim == 1 else b)
        self.n = [int(v) for v in ns]
        self.in_sizes = [g.shape[0] * nl * g.shape[1] for g, nl in zip(b2, self.n)]
        self.out_sizes = [g.shape[0] * nl for g, nl in zip(b2, self.n)]
        self._runs = self._make_runs(xp, b2)
        check_runs_finite(name, "bs", [r[0] for r in self._runs], b2)
        dtype = result_dtype(*[b.dtype for b in b2])
        shape = (sum(self.out_sizes), sum(self.in_sizes))
        super().__init__(dtype=dtype, shape=shape, name=name)

    def _make_runs(self, xp, b2):
        """Merge consecutive layers of equal (n, m): (b (G_tot, m), n, in0, out0)."""
        runs, ci, co = [], 0, 0
        for l, b in enumerate(b2):
            key = (self.n[l], b.shape[1])
            if runs and runs[-1][0] == key:
                runs[-1][1].append(b)
            else:
                runs.append((key, [b], ci, co))
            ci += self.in_sizes[l]
            co += self.out_sizes[l]
        out = []
        for (nl, _), blist, i0, o0 in runs:
            B = blist[0] if len(blist) == 1 else xp.concatenate(blist, axis=0)
            out.append((B, nl, i0, o0))
        return out

    def _matmat(self, X):
        xp, k = self.xp, X.shape[1]
        out = xp.empty((self.shape[0], k), dtype=self._out_dtype(X))
        for B, nl, i0, o0 in self._runs:
            g, m = B.shape
            x = X[i0 : i0 + g * nl * m].reshape(g, nl, m, k)
            out[o0 : o0 + g * nl] = xp.einsum("gnmk,gm->gnk", x, B).reshape(g * nl, k)
        return out

    def _rmatmat(self, Y):
        xp, k = self.xp, Y.shape[1]
        out = xp.empty((self.shape[1], k), dtype=self._out_dtype(Y))
        for B, nl, i0, o0 in self._runs:
            g, m = B.shape
            y = Y[o0 : o0 + g * nl].reshape(g, nl, 1, k)
            out[i0 : i0 + g * nl * m] = (y * B[:, None, :, None]).reshape(g * nl * m, k)
        return out
