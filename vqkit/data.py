"""Shared helpers of the built-in data sets.

Conventions:

* images are kept as ``uint8`` (the smallest faithful form) and converted to
  float32 ``[-1, 1]`` only when an item or a batch is read, by :func:`to_float`;
* item access has a batched fast path: every built-in data set implements
  ``__getitems__(indices) -> list[Tensor]`` (used automatically by
  ``torch.utils.data.DataLoader`` with automatic batching) and
  ``get_batch(indices) -> Tensor (B, C, H, W)`` for callers that index directly;
* randomness is drawn from :func:`rng` seeded by explicit integer keys, never
  from global state, so content is a pure function of params, split and seed
  (and of the epoch for data sets with ``set_epoch``).
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vqkit.errors import VqkitError
from vqkit.interfaces import Dataset

__all__ = [
    "to_float",
    "float_items",
    "rng",
    "name_key",
    "hash_fraction",
    "open_image",
    "to_channels",
    "cover_size",
    "crop_offsets",
    "pil_to_uint8",
    "TensorImageDataset",
]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images (any shape) -> float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def float_items(images: torch.Tensor) -> list[torch.Tensor]:
    """``uint8`` ``(B, C, H, W)`` -> list of ``B`` float32 ``(C, H, W)`` items in ``[-1, 1]``.

    Small items are converted in one vectorized call; large ones one by one, which
    keeps each conversion in cache and avoids a second batch-sized allocation
    (``DataLoader``'s collate stacks the list into a new batch tensor anyway).
    """
    if images.shape[0] and images[0].numel() * 4 >= ITEM_BYTES_ONE_BY_ONE:
        return [to_float(x) for x in images.unbind(0)]
    return list(to_float(images).unbind(0))


#: float item size above which :func:`float_items` converts items one by one
ITEM_BYTES_ONE_BY_ONE = 1 << 16


def name_key(name: str) -> int:
    """A stable 32-bit integer for a string (CRC-32), for seeding."""
    return zlib.crc32(name.encode("utf-8"))


def rng(*keys: int) -> np.random.Generator:
    """A NumPy generator seeded by a tuple of non-negative integer keys.

    Negative keys are mapped to distinct non-negative ones, so any Python int works.
    """
    words = [k * 2 if k >= 0 else -k * 2 - 1 for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def hash_fraction(key: str) -> float:
    """A stable number in ``[0, 1)`` from a string (SHA-256): used for splits that do
    not move when other items are added or removed."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def open_image(path: Path, channels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file to a PIL image of mode ``"L"`` (``channels=1``) or ``"RGB"``.

    EXIF orientation is applied; transparency is composited over white; 16-bit
    images are scaled to 8 bits. ``draft_size`` ``(w, h)`` lets JPEG decoding
    downscale by a power of two while staying at least that large (much faster).
    Any decoding failure raises :class:`VqkitError` naming the file.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB" if channels == 3 else "L", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_channels(img, channels)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise VqkitError(
            f"cannot read image {str(path)!r}: {exc}; remove or replace the file"
        ) from None


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``)."""
    target = "L" if channels == 1 else "RGB"
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != target:
        img = img.convert(target)
    return img


def cover_size(src_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The smallest size ``(h, w)`` with the aspect ratio of ``src_hw`` that covers
    ``target_hw`` (one side equal, the other at least as large)."""
    sh, sw = src_hw
    th, tw = target_hw
    scale = max(th / sh, tw / sw)
    return max(th, round(sh * scale)), max(tw, round(sw * scale))


def crop_offsets(
    size_hw: tuple[int, int], target_hw: tuple[int, int], generator: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner of a ``target_hw`` crop of an image of ``size_hw``: centred when
    ``generator`` is ``None``, else uniform over all positions."""
    dh, dw = size_hw[0] - target_hw[0], size_hw[1] - target_hw[1]
    if generator is None:
        return dh // 2, dw // 2
    return int(generator.integers(0, dh + 1)), int(generator.integers(0, dw + 1))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL ``"L"`` or ``"RGB"`` image -> ``uint8`` tensor ``(C, H, W)``."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class TensorImageDataset(Dataset):
    """Base of data sets held in memory as one ``uint8`` tensor ``(N, C0, H, W)``.

    Subclasses set ``self._images`` (``C0`` is 1 or :attr:`channels`; 1 is expanded
    to :attr:`channels` on read), :attr:`channels` and :attr:`image_size`. Items are
    float32 ``(C, H, W)`` in ``[-1, 1]``; :meth:`get_batch` returns ``(B, C, H, W)``.
    """

    _images: torch.Tensor

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != self.channels:
            x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
        return x

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_float(self._expand(self._images[i]))

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """float32 ``(B, C, H, W)`` in ``[-1, 1]`` for the given item indices."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_float(self._expand(self._images.index_select(0, idx)))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Batched item access used by ``DataLoader`` (one gather, fast conversion)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return float_items(self._expand(self._images.index_select(0, idx)))
