"""vqkit plugin: the perceptual loss ``lpips-official``, the ``lpips`` package itself.

Use it to cross-check vqkit's own ``lpips`` or to train with the reference code. The
ImageNet backbone comes, by default, from the same converted file as vqkit's
(``vqkit weights fetch lpips``), so nothing is downloaded at run time;
``backbone: torchvision`` lets torchvision load (and if needed download) its own.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional

import lpips
import torch
from pydantic import Field, model_validator

import vqkit
from vqkit.errors import VqkitError
from vqkit.interfaces import Params, PerceptualLoss
from vqkit.lpips.nets import TORCHVISION_INDEX
from vqkit.lpips.weights import load_backbone_state

__version__ = "0.1.0"
__all__ = ["LPIPSOfficial", "load_backbone", "__version__"]


class LPIPSOfficialParams(Params):
    net: Literal["alex", "vgg"] = Field("alex", description="backbone: alex (AlexNet) or vgg (VGG16)")
    backbone: Literal["vqkit-cache", "torchvision", "random"] = Field(
        "vqkit-cache",
        description="ImageNet backbone from vqkit's converted file (`vqkit weights fetch lpips`), from "
        "torchvision's own weights (its cache; downloads when absent), or random (seeded; tests)",
    )
    weights: Optional[str] = Field(None, description="converted backbone file for backbone: vqkit-cache; default: the vqkit cache")
    backbone_seed: int = Field(0, ge=0, le=2**32 - 1, description="torch seed of the random backbone (backbone: random only)")
    reduction: Literal["mean", "sum"] = Field("mean", description="how the per-image distances of a batch are combined")

    @model_validator(mode="after")
    def _weights_need_cache(self) -> "LPIPSOfficialParams":
        if self.weights is not None and self.backbone != "vqkit-cache":
            raise ValueError("weights is only read with backbone: vqkit-cache")
        return self


def load_backbone(model: "lpips.LPIPS", state: dict[str, torch.Tensor]) -> None:
    """Copy a vqkit backbone state dict (``conv1.weight``, ...) into ``model.net``
    (torchvision layer indices inside ``sliceK``)."""
    slots = {}
    for key in model.net.state_dict():  # slice<k>.<index>.weight / .bias
        _, index, part = key.split(".")
        slots[(int(index), part)] = key
    net = "alex" if model.pnet_type == "alex" else "vgg"
    mapped = {slots[(index, part)]: state[f"{name}.{part}"] for name, index in TORCHVISION_INDEX[net].items() for part in ("weight", "bias")}
    model.net.load_state_dict(mapped, strict=True)


class LPIPSOfficial(PerceptualLoss):
    """LPIPS computed by the official lpips package (frozen; for cross-checks)."""

    Params = LPIPSOfficialParams
    input_range = (-1.0, 1.0)

    def __init__(self, params: LPIPSOfficialParams | None = None, *, channels: int = 3):
        super().__init__()
        self.params = p = params or self.Params()
        if channels not in (1, 3):
            raise VqkitError(f"lpips-official: images must have 1 or 3 channels, the data has {channels}")
        state = load_backbone_state(p.net, p.weights) if p.backbone == "vqkit-cache" else None
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
            torch.manual_seed(p.backbone_seed)
            try:
                self.model = lpips.LPIPS(net=p.net, pnet_rand=p.backbone != "torchvision", verbose=False)
            except OSError as exc:  # no network and no torchvision cache
                raise VqkitError(
                    f"lpips-official: torchvision could not load its {p.net} weights ({exc}); "
                    f"use backbone: vqkit-cache after `vqkit weights fetch lpips --net {p.net}`"
                ) from None
        if state is not None:
            load_backbone(self.model, state)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    @classmethod
    def example_params(cls, workdir: Path | None = None) -> LPIPSOfficialParams:
        return cls.Params(backbone="random")

    def train(self, mode: bool = True) -> "LPIPSOfficial":
        """Ignored: the network stays in eval mode."""
        return super().train(False)

    def distances(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS, float32 ``(B,)``; inputs ``(B, 1 or 3, H, W)`` in [-1, 1]."""
        if reconstruction.shape[1] == 1:
            reconstruction, target = reconstruction.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return self.model(reconstruction.float(), target.float()).flatten()

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, discriminator=None) -> torch.Tensor:
        d = self.distances(reconstruction, target)
        return d.mean() if self.params.reduction == "mean" else d.sum()


@vqkit.hookimpl
def vqkit_register_perceptual_losses(register):
    register("lpips-official", LPIPSOfficial)
