r"""Elementwise activations ``σ`` with their first two derivatives.

A layer needs ``σ(t)``, ``σ'(t)`` and ``σ''(t)`` at its pre-activation ``t``
(the diagonal factors of ``∇ f`` and of the b-weighted second derivatives,
eqs. 12 and 22). :meth:`Activation.derivs` returns all three from one pass,
sharing the expensive part (one ``tanh`` for tanh, sigmoid and GELU).

Built-in: ``"tanh"``, ``"sigmoid"``, ``"softplus"``, ``"gelu"`` (tanh form,
``0.5 t (1 + tanh(√(2/π)(t + 0.044715 t³)))``), ``"identity"``, ``"relu"``
and ``"leaky_relu"`` (slope 0.01 below zero; :func:`leaky_relu` for another).

ReLU and leaky ReLU are piecewise linear: ``σ'' = 0`` away from the kink at
``t = 0``, so they add no curvature of their own and the Hessian is that of a
piecewise-linear network (exact wherever no pre-activation sits at 0). At
the kink the one-sided derivative of the left piece is used (``σ'(0) = 0``
for ReLU, the slope for leaky ReLU), as PyTorch does; ``σ''`` there is taken
as 0 (the true second derivative is a Dirac mass, which no Hessian of a
finite-difference or autodiff tool sees either). A
user-supplied activation is made with :func:`activation`; its callables must
be array-generic (use ``x.__array_namespace__()`` or
:func:`blockops.backend.get_array_module` rather than ``numpy`` directly) so
that they run on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._util import array_module as get_array_module

__all__ = ["ACTIVATIONS", "Activation", "activation", "get_activation", "leaky_relu"]

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class Activation:
    """An elementwise smooth function with its first two derivatives.

    Parameters
    ----------
    name : str
        Name shown in layer descriptions and in ``Pipeline.spec()``.
    derivs : callable
        ``derivs(t) -> (σ(t), σ'(t), σ''(t))``, elementwise, array-generic.
    functions : tuple of callables or None
        ``(f, df, d2f)`` for a user-supplied activation (kept in the spec so
        that a reference implementation can evaluate it); ``None`` for
        built-ins.
    params : dict or None
        Parameters of a built-in family (``{"negative_slope": s}`` for leaky ReLU).
    """

    def __init__(self, name: str, derivs: Callable, functions: tuple | None = None, params=None):
        self.name = name
        self._derivs = derivs
        self.functions = functions
        self.params = params

    def derivs(self, t):
        """``(σ(t), σ'(t), σ''(t))`` with the dtype and backend of ``t``."""
        return self._derivs(t)

    def __call__(self, t):
        return self._derivs(t)[0]

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


# Derivatives are written without cancellation: 1 - tanh² and s (1 - s) lose
# all digits when a unit saturates (relative error eps / (1 - tanh²): 2e-11 in
# a Hessian at a tanh input of 7.3, against 40-digit mpmath). With
# e = exp(-2|t|), sech²(t) = 4e / (1 + e)² is exact to rounding everywhere.
def _sech2(xp, t):
    e = xp.exp(-2.0 * xp.abs(t))
    return (4.0 * e) / ((1.0 + e) * (1.0 + e))


def _tanh(t):
    xp = get_array_module(t)
    f = xp.tanh(t)
    d1 = _sech2(xp, t)
    return f, d1, -2.0 * f * d1


def _sigmoid_parts(xp, t):
    """``σ(t)``, ``σ'(t) = σ(t) σ(-t)`` and ``tanh(t/2) = σ(t) - σ(-t)``, all cancellation-free."""
    th = xp.tanh(0.5 * t)
    d1 = 0.25 * _sech2(xp, 0.5 * t)  # σ' = sech²(t/2) / 4
    f = xp.exp(-xp.logaddexp(t.dtype.type(0), -t))  # 1 / (1 + e^-t) without overflow
    return f, d1, th


def _sigmoid(t):
    xp = get_array_module(t)
    f, d1, th = _sigmoid_parts(xp, t)
    return f, d1, -d1 * th  # σ'' = σ' (1 - 2σ) = -σ' tanh(t/2)


def _softplus(t):
    xp = get_array_module(t)
    f = xp.logaddexp(t.dtype.type(0), t)  # log(1 + e^t) without overflow
    s, ds, _ = _sigmoid_parts(xp, t)
    return f, s, ds


def _gelu(t):
    xp = get_array_module(t)
    t2 = t * t
    u = _GELU_C * (t + _GELU_A * t2 * t)
    du = _GELU_C * (1.0 + 3.0 * _GELU_A * t2)
    d2u = (6.0 * _GELU_C * _GELU_A) * t
    th = xp.tanh(u)
    sech2 = _sech2(xp, u)
    half_1p = xp.exp(-xp.logaddexp(t.dtype.type(0), -2.0 * u))  # (1 + tanh u)/2 = σ(2u)
    f = t * half_1p
    d1 = half_1p + 0.5 * t * sech2 * du
    d2 = sech2 * (du + 0.5 * t * (d2u - 2.0 * th * du * du))
    return f, d1, d2


def _relu(t):
    xp = get_array_module(t)
    d1 = (t > 0).astype(t.dtype)
    return xp.maximum(t, t.dtype.type(0)), d1, xp.zeros_like(t)


def leaky_relu(negative_slope: float = 0.01) -> Activation:
    """``σ(t) = t`` for ``t > 0`` and ``negative_slope · t`` otherwise (``σ'' = 0``)."""
    a = float(negative_slope)

    def derivs(t):
        xp = get_array_module(t)
        d1 = xp.where(t > 0, t.dtype.type(1), t.dtype.type(a))
        return t * d1, d1, xp.zeros_like(t)

    return Activation("leaky_relu", derivs, params={"negative_slope": a})


def _identity(t):
    xp = get_array_module(t)
    return t, xp.ones_like(t), xp.zeros_like(t)


ACTIVATIONS = {
    "tanh": Activation("tanh", _tanh),
    "sigmoid": Activation("sigmoid", _sigmoid),
    "softplus": Activation("softplus", _softplus),
    "gelu": Activation("gelu", _gelu),
    "identity": Activation("identity", _identity),
    "relu": Activation("relu", _relu),
    "leaky_relu": leaky_relu(0.01),
}


def activation(f: Callable, df: Callable, d2f: Callable, name: str = "custom") -> Activation:
    """A user-supplied smooth elementwise activation.

    Parameters
    ----------
    f, df, d2f : callable
        ``σ``, ``σ'`` and ``σ''``, each mapping an array to an array of the
        same shape, dtype and backend (array-generic: use
        ``t.__array_namespace__()`` for e.g. ``exp``).
    name : str
        Name for descriptions and the spec.

    Examples
    --------
    >>> cubic = activation(lambda t: t + t**3 / 3, lambda t: 1 + t**2, lambda t: 2 * t, "cubic")
    """
    for g, what in ((f, "f"), (df, "df"), (d2f, "d2f")):
        if not callable(g):
            raise TypeError(f"activation {name!r}: {what} must be callable, got {type(g).__name__}")

    def derivs(t):
        return f(t), df(t), d2f(t)

    return Activation(str(name), derivs, (f, df, d2f))


def get_activation(act) -> Activation:
    """An :class:`Activation` from a name, an ``Activation`` or ``None`` (identity)."""
    if act is None:
        return ACTIVATIONS["identity"]
    if isinstance(act, Activation):
        return act
    if isinstance(act, str) and act.lower() in ACTIVATIONS:
        return ACTIVATIONS[act.lower()]
    raise ValueError(
        f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)} "
        "or blockops.network.activation(f, df, d2f, name)"
    )
