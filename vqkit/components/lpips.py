"""The ``lpips`` perceptual loss: LPIPS distance on AlexNet or VGG16 features.

Implemented in :mod:`vqkit.lpips` (plain torch; linear weights from torchmetrics). The
pretrained ImageNet backbone is a converted file made once by
``vqkit weights fetch lpips``; a random backbone is used only when a recipe sets
``pretrained_backbone: false``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import Params, PerceptualLoss
from vqkit.lpips import LPIPS


class LPIPSParams(Params):
    net: Literal["alex", "vgg"] = Field("alex", description="backbone: alex (AlexNet, images >= 31 px) or vgg (VGG16, images >= 16 px; slower)")
    pretrained_backbone: bool = Field(
        True,
        description="use the ImageNet backbone from the converted weights file (create it with "
        "`vqkit weights fetch lpips --net NET`); false: a random, seeded backbone (tests, ablations)",
    )
    weights: Optional[str] = Field(
        None,
        description="path of the converted backbone file (relative to the working directory); "
        "default: $VQKIT_CACHE (or ~/.cache/vqkit)/lpips/<net>_backbone.pt",
    )
    backbone_seed: int = Field(0, ge=0, le=2**32 - 1, description="torch seed of the random backbone (pretrained_backbone: false only)")
    resize: Optional[int] = Field(
        None, ge=16, description="resize both images to resize x resize (bilinear) before the network; for images smaller than the backbone accepts"
    )
    reduction: Literal["mean", "sum"] = Field("mean", description="how the per-image distances of a batch are combined")

    @model_validator(mode="after")
    def _weights_need_pretrained(self) -> "LPIPSParams":
        if self.weights is not None and not self.pretrained_backbone:
            raise ValueError("weights is only read with pretrained_backbone: true")
        return self


class LPIPSLoss(PerceptualLoss):
    """LPIPS distance (AlexNet/VGG16 features, LPIPS v0.1 linear layers); frozen network.

    Constructed as ``cls(params, channels=C)`` with ``C`` in ``{1, 3}`` (grey images are
    replicated to RGB). ``forward(reconstruction, target)``: float32 ``(B, C, H, W)`` in
    ``[-1, 1]``; returns the 0-dim mean (or sum) over the batch of per-image LPIPS.
    The network is frozen and stays in eval mode: ``parameters()`` is empty and
    ``state_dict()`` holds nothing, so gradients reach only the reconstruction.
    """

    Params = LPIPSParams
    input_range = (-1.0, 1.0)

    def __init__(self, params: LPIPSParams | None = None, *, channels: int = 3):
        super().__init__()
        self.params = params or self.Params()
        if channels not in (1, 3):
            raise VqkitError(f"lpips: images must have 1 or 3 channels, the data has {channels}")
        p = self.params
        if p.pretrained_backbone:
            self.lpips = LPIPS.pretrained(p.net, p.weights)
        else:
            self.lpips = LPIPS.random_backbone(p.net, seed=p.backbone_seed)

    @classmethod
    def example_params(cls, workdir: Path | None = None) -> LPIPSParams:
        """Params for contract tests: a random backbone (no weights file needed)."""
        return cls.Params(pretrained_backbone=False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, discriminator=None) -> torch.Tensor:
        size = self.params.resize
        if size is not None:
            reconstruction = F.interpolate(reconstruction, size=(size, size), mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False)
        d = self.lpips(reconstruction, target)
        return d.mean() if self.params.reduction == "mean" else d.sum()


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("lpips", LPIPSLoss)
