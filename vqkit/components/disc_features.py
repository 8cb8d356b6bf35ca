"""The learned perceptual loss ``discriminator-features``.

The distance between the discriminator's feature maps of the reconstruction and of the
target, summed over layers. The discriminator is only *read*: its parameters receive no
gradient from this term and its buffers (e.g. BatchNorm running statistics) are not
updated, while the reconstruction receives the full gradient.

How: the discriminator's ``features`` runs through :func:`torch.func.functional_call`
with detached parameters and cloned buffers. No ``requires_grad`` flag is ever changed,
so the term is safe with DDP-wrapped, partly frozen or concurrently used discriminators,
and an exception leaves the module exactly as it was (``functional_call`` restores the
module's own tensors in a ``finally``).

Because the detached parameters share storage with the real ones, take the generator's
backward pass *before* the discriminator's optimizer step (the usual VQGAN order);
otherwise autograd reports an in-place modification.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import Discriminator, Params, PerceptualLoss
from vqkit.lpips.model import normalize_channels

__all__ = ["DiscriminatorFeatures", "frozen_features"]


class _Features(nn.Module):
    """Adapter so ``functional_call`` (which calls ``forward``) runs ``features``."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.d = discriminator

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.d.features(x)


def _unwrap(discriminator: nn.Module) -> nn.Module:
    """The module that has ``features``: unwraps DDP / DataParallel."""
    while isinstance(discriminator, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        discriminator = discriminator.module
    return discriminator


def frozen_features(discriminator: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``discriminator.features(x)`` computed with detached parameters and throw-away
    buffer copies: differentiable w.r.t. ``x`` only; the discriminator is not modified."""
    d = _unwrap(discriminator)
    tensors = {f"d.{n}": p.detach() for n, p in d.named_parameters()}
    tensors.update({f"d.{n}": b.clone() for n, b in d.named_buffers()})
    return functional_call(_Features(d), tensors, (x,), strict=True)


class DiscriminatorFeatures(PerceptualLoss):
    """Learned perceptual loss: distance between discriminator features of reconstruction and target."""

    input_range = (-1.0, 1.0)
    needs_discriminator = True

    class Params(Params):
        distance: Literal["l1", "l2"] = Field(
            "l1", description="Per-layer distance: l1 (mean absolute) or l2 (mean squared)."
        )
        layers: list[int] | None = Field(
            None,
            description="Indices into the discriminator's feature maps to compare "
            "(negative counts from the end); default: all.",
        )
        normalize: bool = Field(
            False,
            description="Unit-normalize each feature vector over channels before the distance "
            "(as LPIPS does), so layers count alike however their scale drifts while the "
            "discriminator trains.",
        )
        layer_weights: list[float] | None = Field(
            None,
            description="Weight per compared layer (same length as layers, or as the "
            "discriminator's feature list when layers is unset); default: 1 each.",
        )

        @model_validator(mode="after")
        def _consistent(self) -> "DiscriminatorFeatures.Params":
            if self.layers is not None:
                if not self.layers:
                    raise ValueError("layers must not be empty (leave it unset for all layers)")
                if len(set(self.layers)) != len(self.layers):
                    raise ValueError(f"layers has duplicates: {self.layers}")
            if self.layer_weights is not None:
                if any(w < 0 for w in self.layer_weights):
                    raise ValueError(f"layer_weights must be >= 0, got {self.layer_weights}")
                if self.layers is not None and len(self.layer_weights) != len(self.layers):
                    raise ValueError(
                        f"layer_weights has {len(self.layer_weights)} entries but layers has "
                        f"{len(self.layers)}; give one weight per layer"
                    )
            return self

    def __init__(self, params: Params | None = None, *, channels: int):
        super().__init__()
        self.params = params if params is not None else self.Params()
        self.channels = channels

    def _selection(self, n: int) -> list[tuple[int, float]]:
        p = self.params
        layers = list(range(n)) if p.layers is None else list(p.layers)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise VqkitError(
                f"perceptual loss 'discriminator-features': layers {bad} do not exist; the "
                f"discriminator gives {n} feature maps (valid indices: 0..{n - 1} or -{n}..-1)"
            )
        weights = [1.0] * len(layers) if p.layer_weights is None else list(p.layer_weights)
        if len(weights) != len(layers):
            raise VqkitError(
                f"perceptual loss 'discriminator-features': layer_weights has {len(weights)} "
                f"entries but {len(layers)} layers are compared (the discriminator gives {n} "
                f"feature maps); set layers or give one weight per layer"
            )
        return list(zip(layers, weights))

    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        discriminator: Discriminator | None = None,
    ) -> torch.Tensor:
        """``reconstruction``, ``target``: float ``(B, C, H, W)`` in ``[-1, 1]``; returns a
        0-dim float32 tensor, the weighted sum over layers of mean l1/l2 feature distance."""
        if discriminator is None:
            raise VqkitError(
                "perceptual loss 'discriminator-features' needs a discriminator: add a "
                "`discriminator:` section to the recipe (e.g. `discriminator: {name: patchgan}`) "
                "or use another perceptual loss"
            )
        fake = frozen_features(discriminator, reconstruction)
        with torch.no_grad():
            real = frozen_features(discriminator, target.detach())
        distance = F.l1_loss if self.params.distance == "l1" else F.mse_loss
        total = reconstruction.new_zeros((), dtype=torch.float32)
        for i, w in self._selection(len(fake)):
            f, r = fake[i].float(), real[i].float()
            if self.params.normalize:
                f, r = normalize_channels(f), normalize_channels(r)
            total = total + w * distance(f, r)
        return total


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("discriminator-features", DiscriminatorFeatures)
