"""Pixel-space reconstruction losses: ``pixel-l1`` and ``pixel-l2``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqkit import hookimpl
from vqkit.interfaces import Params, PerceptualLoss


class PixelL1(PerceptualLoss):
    """Mean absolute error between reconstruction and target pixels."""

    input_range = (-1.0, 1.0)

    def __init__(self, params: Params | None = None, *, channels: int = 3):
        super().__init__()
        self.params = params or self.Params()

    def forward(self, reconstruction, target, discriminator=None) -> torch.Tensor:
        return F.l1_loss(reconstruction, target)


class PixelL2(PixelL1):
    """Mean squared error between reconstruction and target pixels."""

    def forward(self, reconstruction, target, discriminator=None) -> torch.Tensor:
        return F.mse_loss(reconstruction, target)


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("pixel-l1", PixelL1)
    register("pixel-l2", PixelL2)
