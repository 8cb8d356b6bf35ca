"""The n-layer PatchGAN discriminator (``patchgan``), as in pix2pix and VQGAN.

Geometry (``n = n_layers``): ``n`` blocks of 4×4 stride-2 convolutions, one 4×4
stride-1 block, then a 4×4 stride-1 convolution to one logit per patch. Widths are
``channels · min(2^k, 8)`` for block ``k``. Each side of an ``S``-pixel input gives
``floor(S / 2^n) - 2`` patch logits, so inputs need at least ``3 · 2^n`` pixels per side
(24 for the default ``n_layers=3``, 12 for ``n_layers=2``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import Discriminator, Params

__all__ = ["PatchGAN", "init_dcgan_"]


def init_dcgan_(module: nn.Module) -> None:
    """DCGAN/pix2pix initialisation, in place: conv weights ~ N(0, 0.02), norm scales
    ~ N(1, 0.02), all biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class PatchGAN(Discriminator):
    """n-layer PatchGAN: (B, C, H, W) in [-1, 1] -> patch logits (B, 1, H/2^n - 2, W/2^n - 2).

    ``features(x)`` returns the ``n_layers + 1`` feature maps after each block's
    activation (LeakyReLU 0.2), from high to low resolution.
    """

    class Params(Params):
        n_layers: int = Field(
            3, ge=1, le=6, description="Stride-2 blocks; inputs need at least 3*2^n_layers px per side."
        )
        channels: int = Field(64, ge=1, description="Width of the first block (doubles per block, up to 8x).")
        norm: Literal["group", "batch", "instance", "none"] = Field(
            "group",
            description="Normalization after each inner conv. group (default) does not depend "
            "on the batch, so it behaves with small batches and under DDP; batch is the "
            "pix2pix/VQGAN choice (convert to SyncBatchNorm for DDP).",
        )

    def __init__(self, params: Params | None = None, *, channels: int):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        self.in_channels = channels
        bias = p.norm == "none"  # a norm layer right after makes a conv bias redundant
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731

        widths = [p.channels * min(2**k, 8) for k in range(p.n_layers + 1)]
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(channels, widths[0], 4, stride=2, padding=1), act())
        ]
        for k in range(1, p.n_layers + 1):
            stride = 2 if k < p.n_layers else 1
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(widths[k - 1], widths[k], 4, stride=stride, padding=1, bias=bias),
                    _norm(p.norm, widths[k]),
                    act(),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)
        init_dcgan_(self)

    @property
    def min_size(self) -> int:
        """Smallest image side (pixels) that gives at least one patch logit."""
        return 3 * 2**self.params.n_layers

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator 'patchgan' expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            raise VqkitError(
                f"discriminator 'patchgan' with n_layers={self.params.n_layers} needs images of "
                f"at least {self.min_size}x{self.min_size} px (3*2^n_layers), got {h}x{w}; "
                f"lower discriminator.params.n_layers"
            )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each block: ``n_layers + 1`` tensors ``(B, c_k, h_k, w_k)``."""
        self._check(x)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, 1, h, w)`` (unbounded; positive means "real")."""
        return self.out(self.features(x)[-1])


@hookimpl
def vqkit_register_discriminators(register):
    register("patchgan", PatchGAN)
