"""``natural-patches``: square crops of scikit-image's bundled colour photographs.

Only photographs shipped inside the scikit-image wheel are used (read straight from
the package folder, so nothing is ever downloaded): see :data:`SOURCES`. The split
is by source image: ``train_images`` and ``test_images`` must not overlap, so no
test crop shares pixels with a training crop.

Each crop has a side of ``image_size * s`` source pixels, ``s`` drawn log-uniformly
from ``scale`` (capped by the image), is resized to ``image_size`` (antialiased) and
optionally mirrored. Crops whose pixel standard deviation is below ``min_std`` (flat
sky, black borders) are redrawn a few times. The whole set is cut once, at
construction, into one ``uint8`` tensor.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, model_validator

from vqkit import hookimpl
from vqkit.data import TensorImageDataset, name_key, open_image, pil_to_uint8, rng
from vqkit.errors import VqkitError
from vqkit.interfaces import Params

#: name -> file inside ``skimage/data`` (bundled in the wheel, RGB photographs).
#: ``motorcycle_right`` is left out: it is a near duplicate of ``motorcycle_left``.
SOURCES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "ihc": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
}
SourceName = Literal[
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "ihc",
    "hubble_deep_field", "retina",
]
MAX_TRIES = 8


def skimage_data_dir() -> Path:
    """The folder of scikit-image's bundled sample images."""
    import skimage.data

    return Path(skimage.data.__file__).parent


class NaturalPatchesParams(Params):
    image_size: int = Field(32, ge=4, le=256, description="crop height = width, in pixels")
    patches_per_image: int = Field(
        1024, ge=1, le=100_000, description="crops cut from each source image of the split"
    )
    train_images: list[SourceName] = Field(
        default_factory=lambda: [
            "astronaut", "coffee", "rocket", "motorcycle_left", "ihc",
            "hubble_deep_field", "retina",
        ],
        description="source photographs of the train split (skimage.data names)",
    )
    test_images: list[SourceName] = Field(
        default_factory=lambda: ["chelsea"],
        description="source photographs of the test split; disjoint from train_images",
    )
    scale: tuple[float, float] = Field(
        (1.0, 4.0),
        description="range of crop side / image_size (log-uniform); >1 zooms out",
    )
    hflip: bool = Field(True, description="mirror half of the crops")
    min_std: float = Field(
        4.0, ge=0, description="redraw crops whose pixel std (0-255 scale) is below this"
    )
    channels: Literal[1, 3] = Field(3, description="3: RGB; 1: luminance")

    @model_validator(mode="after")
    def _check(self) -> "NaturalPatchesParams":
        overlap = sorted(set(self.train_images) & set(self.test_images))
        if overlap:
            raise ValueError(f"train_images and test_images overlap: {overlap}")
        if not self.train_images or not self.test_images:
            raise ValueError("train_images and test_images must each name at least one image")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        return self


class NaturalPatches(TensorImageDataset):
    """Crops of scikit-image's bundled colour photographs, split by source image.

    Items are float32 ``(channels, image_size, image_size)`` in ``[-1, 1]``; the
    ``train`` split has ``patches_per_image * len(train_images)`` items, grouped by
    source image in list order; crops depend only on (seed, image name, params).
    """

    Params = NaturalPatchesParams

    def __init__(self, params: NaturalPatchesParams | None = None, *, split: str = "train", seed: int = 0):
        super().__init__()
        self.params = params = params or self.Params()
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.seed = seed
        names = params.train_images if split == "train" else params.test_images
        self.sources: list[str] = list(names)
        size = params.image_size
        out = torch.empty((len(names) * params.patches_per_image, params.channels, size, size),
                          dtype=torch.uint8)
        for k, name in enumerate(names):
            image = self._load(name, params.channels)
            start = k * params.patches_per_image
            out[start: start + params.patches_per_image] = self._cut(image, name, seed, params)
        self._images = out
        #: index of the source image (in :attr:`sources`) of each item, int64 ``(N,)``
        self.source_index = torch.arange(len(names)).repeat_interleave(params.patches_per_image)
        self.channels = params.channels
        self.image_size = (size, size)

    @classmethod
    def example_params(cls, workdir: Path | None = None) -> NaturalPatchesParams:
        """Small params for contract checks and tests (8 crops per image)."""
        return cls.Params(patches_per_image=8)

    @staticmethod
    def _load(name: str, channels: int) -> Image.Image:
        path = skimage_data_dir() / SOURCES[name]
        if not path.is_file():
            raise VqkitError(
                f"scikit-image sample image {name!r} not found at {str(path)!r}; reinstall "
                "scikit-image (`pip install --force-reinstall scikit-image`)"
            )
        return open_image(path, channels)

    @staticmethod
    def _cut(image: Image.Image, name: str, seed: int, params: NaturalPatchesParams) -> torch.Tensor:
        size = params.image_size
        width, height = image.size
        limit = min(width, height)
        if limit < size:
            raise VqkitError(f"image_size {size} is larger than source image {name!r} ({width}x{height})")
        gen = rng(seed, name_key(name))
        log_lo, log_hi = math.log(params.scale[0]), math.log(params.scale[1])
        crops = torch.empty((params.patches_per_image, params.channels, size, size), dtype=torch.uint8)
        for j in range(params.patches_per_image):
            for _ in range(MAX_TRIES):
                side = round(size * math.exp(gen.uniform(log_lo, log_hi)))
                side = min(max(side, 1), limit)
                top = int(gen.integers(0, height - side + 1))
                left = int(gen.integers(0, width - side + 1))
                flip = params.hflip and bool(gen.integers(0, 2))
                crop = image.crop((left, top, left + side, top + side))
                if side != size:
                    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
                tensor = pil_to_uint8(crop)
                if params.min_std <= 0 or float(tensor.float().std()) >= params.min_std:
                    break
            if flip:
                tensor = tensor.flip(-1)
            crops[j] = tensor
        return crops


@hookimpl
def vqkit_register_datasets(register):
    register("natural-patches", NaturalPatches)
