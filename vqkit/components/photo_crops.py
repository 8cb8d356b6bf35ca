"""``photo-crops``: square crops of photographs in a folder, split by source photograph.

Like ``natural-patches``, but the photographs are files you name: ``train_files`` and
``test_files`` are paths relative to ``root`` (or absolute) and must not overlap, so no
test crop shares pixels with a training crop. Each source is decoded once, shrunk so
that its longer side is at most ``source_max_side`` (large wallpapers would otherwise
give crops of flat detail), then cut exactly as ``natural-patches`` cuts (side
``image_size * s`` with ``s`` log-uniform in ``scale``, resized, optionally mirrored,
flat crops redrawn), into one ``uint8`` tensor at construction.

Example: the photographs of Debian's ``plasma-workspace-wallpapers`` package
(``apt-get install plasma-workspace-wallpapers``), used by ``recipes/perceptual-*.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
from PIL import Image
from pydantic import Field, model_validator

from vqkit import hookimpl
from vqkit.components.natural_patches import NaturalPatches
from vqkit.data import TensorImageDataset, open_image
from vqkit.errors import VqkitError
from vqkit.interfaces import Params


class PhotoCropsParams(Params):
    root: str = Field(description="folder the file names are relative to (relative: to the working directory)")
    train_files: list[str] = Field(min_length=1, description="photographs of the train split (paths under root)")
    test_files: list[str] = Field(min_length=1, description="photographs of the test split; disjoint from train_files")
    image_size: int = Field(64, ge=4, le=512, description="crop height = width, in pixels")
    patches_per_image: int = Field(512, ge=1, le=100_000, description="crops cut from each photograph of the split")
    source_max_side: Optional[int] = Field(
        800, ge=16, description="shrink each photograph (antialiased) so its longer side is at most this; null: keep"
    )
    scale: tuple[float, float] = Field((1.0, 4.0), description="range of crop side / image_size (log-uniform); >1 zooms out")
    hflip: bool = Field(True, description="mirror half of the crops")
    min_std: float = Field(4.0, ge=0, description="redraw crops whose pixel std (0-255 scale) is below this")
    channels: Literal[1, 3] = Field(3, description="3: RGB; 1: luminance")

    @model_validator(mode="after")
    def _check(self) -> "PhotoCropsParams":
        overlap = sorted(set(self.train_files) & set(self.test_files))
        if overlap:
            raise ValueError(f"train_files and test_files overlap: {overlap}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        return self


class PhotoCrops(TensorImageDataset):
    """Crops of named photographs, split by photograph.

    Items are float32 ``(channels, image_size, image_size)`` in ``[-1, 1]``; a split has
    ``patches_per_image * len(files)`` items grouped by photograph in list order; crops
    depend only on (seed, file name, params).
    """

    Params = PhotoCropsParams

    def __init__(self, params: PhotoCropsParams | None = None, *, split: str = "train", seed: int = 0):
        super().__init__()
        if params is None:
            raise VqkitError("photo-crops needs params (root, train_files, test_files)")
        self.params = params
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.seed = seed
        files = params.train_files if split == "train" else params.test_files
        self.sources: list[str] = list(files)
        size = params.image_size
        n = params.patches_per_image
        out = torch.empty((len(files) * n, params.channels, size, size), dtype=torch.uint8)
        for k, name in enumerate(files):
            image = self._load(name)
            out[k * n: (k + 1) * n] = NaturalPatches._cut(image, name, seed, params)
        self._images = out
        #: index of the source photograph (in :attr:`sources`) of each item, int64 ``(N,)``
        self.source_index = torch.arange(len(files)).repeat_interleave(n)
        self.channels = params.channels
        self.image_size = (size, size)

    @classmethod
    def example_params(cls, workdir: Path | None = None) -> PhotoCropsParams:
        """Small params for contract checks: two of scikit-image's bundled photographs."""
        from vqkit.components.natural_patches import SOURCES, skimage_data_dir

        return cls.Params(
            root=str(skimage_data_dir()), train_files=[SOURCES["astronaut"]], test_files=[SOURCES["coffee"]],
            image_size=32, patches_per_image=8,
        )

    def _load(self, name: str) -> Image.Image:
        p = self.params
        path = Path(name) if Path(name).is_absolute() else Path(p.root) / name
        if not path.is_file():
            raise VqkitError(f"photo-crops: {str(path)!r} not found (data.params.root is {p.root!r})")
        image = open_image(path, p.channels)
        limit = p.source_max_side
        if limit is not None and max(image.size) > limit:
            w, h = image.size
            f = limit / max(w, h)
            image = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
        return image


@hookimpl
def vqkit_register_datasets(register):
    register("photo-crops", PhotoCrops)
