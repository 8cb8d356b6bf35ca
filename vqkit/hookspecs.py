"""The hook specifications of vqkit: one hook per component kind.

Every hook receives a ``register(name, cls)`` callback; a plugin may call it any
number of times. Implementations are marked with :data:`vqkit.hookimpl` and found
through the ``vqkit`` entry-point group (the built-in components use the same path).
Implementations may accept fewer arguments than the spec, so specs can grow.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("vqkit")


@hookspec
def vqkit_register_encoders(register):
    """Register :class:`vqkit.interfaces.Encoder` classes: ``register("conv", ConvEncoder)``."""


@hookspec
def vqkit_register_quantizers(register):
    """Register :class:`vqkit.interfaces.Quantizer` classes."""


@hookspec
def vqkit_register_decoders(register):
    """Register :class:`vqkit.interfaces.Decoder` classes."""


@hookspec
def vqkit_register_perceptual_losses(register):
    """Register :class:`vqkit.interfaces.PerceptualLoss` classes."""


@hookspec
def vqkit_register_reset_policies(register):
    """Register :class:`vqkit.interfaces.CodebookResetPolicy` classes."""


@hookspec
def vqkit_register_datasets(register):
    """Register :class:`vqkit.interfaces.Dataset` classes."""


@hookspec
def vqkit_register_discriminators(register):
    """Register :class:`vqkit.interfaces.Discriminator` classes."""


@hookspec
def vqkit_register_priors(register):
    """Register :class:`vqkit.interfaces.Prior` classes (models of code grids)."""


@hookspec
def vqkit_register_launchers(register):
    """Register :class:`vqkit.interfaces.Launcher` classes (where a sweep's children run)."""


@hookspec
def vqkit_register_searches(register):
    """Register :class:`vqkit.interfaces.Search` classes (which combinations a sweep trains)."""
