"""``fashion-mnist``: Zalando's Fashion-MNIST read from local idx files.

The files are those of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``): ``train-images-idx3-ubyte.gz`` (60 000
images, the ``train`` split), ``t10k-images-idx3-ubyte.gz`` (10 000, the ``test``
split) and the matching ``*-labels-idx1-ubyte.gz``. Uncompressed files (same names
without ``.gz``) work too. Nothing is ever downloaded.

Images are 28×28 grey garments on a black background. By default they are padded
with background to 32×32, so that encoders with factor 4 or 8 get 8×8 or 4×4
latents without resampling the pixels; ``fit: resize`` resamples instead.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vqkit import hookimpl
from vqkit.data import TensorImageDataset
from vqkit.errors import VqkitError
from vqkit.interfaces import Params

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "VQKIT_FASHION_MNIST_DIR"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
NATIVE_SIZE = 28
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


class FashionMnistParams(Params):
    root: Optional[str] = Field(
        None,
        description=f"folder with the idx files (default: ${ROOT_ENV}, else {DEFAULT_ROOT}, "
        f"installed by `{INSTALL_HINT}`)",
    )
    image_size: int = Field(
        32, ge=4, le=1024,
        description="output height = width; 32 gives clean factor-4/8 latents",
    )
    fit: Literal["pad", "resize"] = Field(
        "pad",
        description="pad: centre the 28x28 image on background (image_size >= 28); "
        "resize: resample to image_size (bilinear, antialiased)",
    )
    channels: Literal[1, 3] = Field(1, description="1: grey; 3: grey replicated to RGB")
    classes: Optional[list[int]] = Field(
        None, description="keep only these labels (0-9: " + ", ".join(
            f"{i} {n}" for i, n in enumerate(CLASS_NAMES)) + "); null: all",
    )
    limit: Optional[int] = Field(
        None, ge=1, description="keep at most the first N images of the split (null: all)"
    )

    @model_validator(mode="after")
    def _check(self) -> "FashionMnistParams":
        if self.fit == "pad" and self.image_size < NATIVE_SIZE:
            raise ValueError(
                f"fit 'pad' needs image_size >= {NATIVE_SIZE}, got {self.image_size}; "
                "use fit: resize for smaller images"
            )
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c <= 9]
            if bad or not self.classes:
                raise ValueError(f"classes must be a non-empty list of labels 0-9, got {self.classes}")
        return self


def resolve_root(root: str | None) -> Path:
    """The folder to read: ``root``, else ``$VQKIT_FASHION_MNIST_DIR``, else the Debian path."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise VqkitError(
        f"Fashion-MNIST file {stem}(.gz) not found in {str(root)!r}; install the data with "
        f"`{INSTALL_HINT}` (files go to {DEFAULT_ROOT}) or set the dataset's `root` "
        f"param (or ${ROOT_ENV}) to a folder holding the idx files"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) whose big-endian header starts with ``magic``
    (``0x803``: uint8 ``(N, rows, cols)``, ``0x801``: uint8 ``(N,)``)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise VqkitError(f"cannot read {str(path)!r}: {exc}; reinstall with `{INSTALL_HINT}`") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise VqkitError(f"{str(path)!r} is not an idx file of the expected kind (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise VqkitError(
            f"{str(path)!r} is truncated or corrupt: header says {shape} "
            f"({count} bytes), file has {len(data) - header}; reinstall with `{INSTALL_HINT}`"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMnist(TensorImageDataset):
    """Fashion-MNIST garments (Debian package dataset-fashion-mnist), 1x32x32 by default.

    ``train``: the 60 000 training images; ``test``: the 10 000 test images, in file
    order (the seed is not used: the content is fixed). Items are float32
    ``(channels, image_size, image_size)`` in ``[-1, 1]``, background -1.
    :attr:`labels` holds the int64 class of each item.
    """

    Params = FashionMnistParams

    def __init__(self, params: FashionMnistParams | None = None, *, split: str = "train", seed: int = 0):
        super().__init__()
        self.params = params = params or self.Params()
        if split not in _PREFIX:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        root = resolve_root(params.root)
        prefix = _PREFIX[split]
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), _IMAGES_MAGIC)
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), _LABELS_MAGIC)
        if len(images) != len(labels):
            raise VqkitError(f"Fashion-MNIST {split} files in {str(root)!r} disagree: "
                             f"{len(images)} images, {len(labels)} labels")
        keep = np.arange(len(images))
        if params.classes is not None:
            keep = keep[np.isin(labels, params.classes)]
        if params.limit is not None:
            keep = keep[: params.limit]
        x = torch.from_numpy(images[keep].copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = torch.from_numpy(labels[keep].astype(np.int64))
        self._images = self._fit(x, params)
        self.channels = params.channels
        self.image_size = (params.image_size, params.image_size)

    @classmethod
    def example_params(cls, workdir: Path | None = None) -> FashionMnistParams:
        """Small params for contract checks and tests (the first 64 images)."""
        return cls.Params(limit=64)

    @staticmethod
    def _fit(x: torch.Tensor, params: FashionMnistParams) -> torch.Tensor:
        size = params.image_size
        if size == NATIVE_SIZE:
            return x
        if params.fit == "pad":
            before = (size - NATIVE_SIZE) // 2
            after = size - NATIVE_SIZE - before
            return F.pad(x, (before, after, before, after), value=0)
        out = torch.empty((x.shape[0], 1, size, size), dtype=torch.uint8)
        for start in range(0, x.shape[0], 4096):  # bounded float temporaries
            chunk = x[start: start + 4096].to(torch.float32)
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)
            out[start: start + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
        return out


@hookimpl
def vqkit_register_datasets(register):
    register("fashion-mnist", FashionMnist)
