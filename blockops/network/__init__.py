"""Layered pipelines: layers, losses, forward pass, backprop and per-layer derivative blocks.

See :mod:`blockops.network.layer` for the interface and shape conventions,
and the docs (architecture, "Conventions") for the parameter layouts.
"""

from .activations import ACTIVATIONS, Activation, activation, get_activation, leaky_relu
from .auxiliary import AuxiliaryScalarLoss
from .dense import Dense
from .elementwise import Bias, Elementwise, Scale
from .layer import Cache, Layer
from .losses import CustomLoss, Loss, MSELoss, SoftmaxCrossEntropy
from .pipeline import Pipeline, Point
from .residual import Residual

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "AuxiliaryScalarLoss",
    "Bias",
    "Cache",
    "CustomLoss",
    "Dense",
    "Elementwise",
    "Layer",
    "Loss",
    "MSELoss",
    "Pipeline",
    "Point",
    "Residual",
    "Scale",
    "SoftmaxCrossEntropy",
    "activation",
    "get_activation",
    "leaky_relu",
]
