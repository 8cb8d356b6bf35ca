"""AlexNet and VGG16 feature stacks for LPIPS, in plain torch (no torchvision).

Both networks take float32 ``(B, 3, H, W)`` images already shifted and scaled by the
LPIPS scaling layer and return the five ReLU feature maps LPIPS compares, each
``(B, C_k, H_k, W_k)`` with ``C_k`` in :attr:`channels`.

Layer names are vqkit's own (``conv1`` ... ``conv5`` for AlexNet, ``conv1_1`` ...
``conv5_3`` for VGG16); :data:`TORCHVISION_INDEX` maps them to the indices of
``torchvision.models.<net>().features`` so weights can be exchanged with it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlexNetFeatures", "VGG16Features", "BACKBONES", "TORCHVISION_INDEX", "build_backbone"]


class AlexNetFeatures(nn.Module):
    """The five convolutions of AlexNet; outputs relu1 ... relu5."""

    channels: ClassVar[tuple[int, ...]] = (64, 192, 384, 256, 256)
    #: Smallest input side the two 3x3/2 max-pools accept.
    min_size: ClassVar[int] = 31

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(64, 192, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(192, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, kernel_size=3, padding=1)

    def conv_names(self) -> list[str]:
        return ["conv1", "conv2", "conv3", "conv4", "conv5"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r1 = F.relu(self.conv1(x))
        r2 = F.relu(self.conv2(F.max_pool2d(r1, kernel_size=3, stride=2)))
        r3 = F.relu(self.conv3(F.max_pool2d(r2, kernel_size=3, stride=2)))
        r4 = F.relu(self.conv4(r3))
        r5 = F.relu(self.conv5(r4))
        return [r1, r2, r3, r4, r5]


#: VGG16 convolution widths, one tuple per stage (a 2x2 max-pool between stages).
_VGG_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG16Features(nn.Module):
    """The thirteen 3x3 convolutions of VGG16; outputs relu1_2, relu2_2, relu3_3,
    relu4_3 and relu5_3 (the last ReLU of each stage)."""

    channels: ClassVar[tuple[int, ...]] = tuple(stage[-1] for stage in _VGG_STAGES)
    #: Smallest input side the four 2x2 max-pools accept.
    min_size: ClassVar[int] = 16

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for s, stage in enumerate(_VGG_STAGES, start=1):
            for i, c_out in enumerate(stage, start=1):
                self.add_module(f"conv{s}_{i}", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
                c_in = c_out

    def conv_names(self) -> list[str]:
        return [f"conv{s}_{i}" for s, stage in enumerate(_VGG_STAGES, 1) for i in range(1, len(stage) + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for s, stage in enumerate(_VGG_STAGES, start=1):
            if s > 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for i in range(1, len(stage) + 1):
                x = F.relu(getattr(self, f"conv{s}_{i}")(x))
            taps.append(x)
        return taps


#: net name (as in recipes and the CLI) -> feature stack class
BACKBONES: dict[str, type[nn.Module]] = {"alex": AlexNetFeatures, "vgg": VGG16Features}

#: net -> {vqkit conv name: index in ``torchvision.models.<net>().features``}
TORCHVISION_INDEX: dict[str, dict[str, int]] = {
    "alex": {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10},
    "vgg": {
        "conv1_1": 0, "conv1_2": 2,
        "conv2_1": 5, "conv2_2": 7,
        "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
        "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
        "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
    },
}


def build_backbone(net: str) -> nn.Module:
    """A randomly initialised (global torch RNG) feature stack for ``net`` ('alex' | 'vgg')."""
    return BACKBONES[net]()


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of the ``net`` backbone, computed without allocating."""
    with torch.device("meta"):
        module = build_backbone(net)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
