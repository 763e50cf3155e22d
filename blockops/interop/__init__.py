"""Adapters from the models people already have to blockops pipelines.

* :mod:`blockops.interop.torch` (extra ``torch``): ``from_torch`` for an
  ``nn.Sequential`` of linear layers and activations, ``TorchLayer`` for any
  per-sample block through ``torch.func``, and operators on torch tensors.
* :mod:`blockops.interop.jax` (extra ``jax``): ``FunctionLayer`` for a
  per-sample JAX function and ``from_jax`` for a chain of them.

Each submodule imports its framework when imported itself; no other
blockops module imports torch or jax (pylops itself imports both at start-up
when they are installed, which blockops does not change).
"""
