"""``image-folder``: every PNG/JPEG image under a folder (recursive).

Files are found recursively (hidden files and folders skipped), matched by
extension case-insensitively, and sorted by their path relative to ``root``.

Split: a file is in ``test`` when the SHA-256 of its relative path, read as a number
in ``[0, 1)``, is below ``test_fraction``; so a file never changes split when others
are added or removed. Exception, for tiny folders: when that leaves one split empty
(and ``0 < test_fraction``, at least 2 files), the file nearest the boundary moves.

Each image is decoded (EXIF orientation applied, transparency composited over white,
16-bit scaled to 8-bit, converted to ``channels``), resized so that it covers
``image_size`` (shorter side fits, aspect kept) and cropped: centred for ``test``
and for ``train_crop: center``; for ``train_crop: random`` the crop (and the mirror,
with ``hflip``) is drawn from a generator seeded by ``(seed, epoch, index)``: call
:meth:`ImageFolder.set_epoch` to get fresh crops each epoch. ``fit: stretch``
resizes to ``image_size`` ignoring the aspect ratio instead.

Memory: the resized images are decoded once, at construction, and kept (uint8)
when their estimated size is below ``preload_mb``; beyond that budget files are
decoded on each access (in the DataLoader workers). :meth:`ImageFolder.check`
(``vqkit validate --build``) decodes every file that was not preloaded.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from vqkit import hookimpl
from vqkit.data import (
    cover_size,
    crop_offsets,
    float_items,
    hash_fraction,
    open_image,
    pil_to_uint8,
    rng,
    to_float,
)
from vqkit.errors import Problem, VqkitError
from vqkit.interfaces import Dataset, Params

Size = Annotated[int, Field(ge=1, le=8192)]
DEFAULT_EXTENSIONS = [".png", ".jpg", ".jpeg"]


#: bad files named one per line; the rest are counted
MAX_BAD_SHOWN = 20


def bad_images_error(messages: list[str]) -> VqkitError:
    """One user error listing every file that cannot be decoded (the first
    :data:`MAX_BAD_SHOWN`, then how many more)."""
    shown = [Problem(text) for text in messages[:MAX_BAD_SHOWN]]
    if len(messages) > MAX_BAD_SHOWN:
        shown.append(Problem(f"... and {len(messages) - MAX_BAD_SHOWN} more images that cannot be read"))
    return VqkitError(shown)


class ImageFolderParams(Params):
    root: str = Field(description="folder searched recursively for images (relative: to the working directory)")
    image_size: Union[Size, tuple[Size, Size]] = Field(
        128, description="output size: N for NxN, or [height, width]"
    )
    channels: Literal[1, 3] = Field(3, description="3: RGB; 1: luminance (images are converted)")
    fit: Literal["crop", "stretch"] = Field(
        "crop", description="crop: keep aspect, resize to cover then crop; stretch: resize to size"
    )
    train_crop: Literal["center", "random"] = Field(
        "random", description="crop position in the train split (test is always centred)"
    )
    hflip: bool = Field(False, description="mirror half of the train images (per seed, epoch, index)")
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of files in the test split (by path hash)"
    )
    extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        description="file extensions read (case-insensitive)",
    )
    limit: Optional[int] = Field(
        None, ge=1, description="keep at most the first N files of the split (sorted by path)"
    )
    preload_mb: float = Field(
        512.0, ge=0, description="keep decoded images in memory up to this size (MiB); 0: never"
    )

    @field_validator("extensions")
    @classmethod
    def _normalize_extensions(cls, value: list[str]) -> list[str]:
        out = []
        for ext in value:
            ext = ext.strip().lower()
            if not ext or ext == ".":
                raise ValueError("extensions must be non-empty, e.g. '.png'")
            out.append(ext if ext.startswith(".") else "." + ext)
        if not out:
            raise ValueError("extensions must name at least one extension")
        return out


def list_images(root: Path, extensions: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, sorted (hidden entries skipped)."""
    exts = tuple(extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def split_files(files: Sequence[str], test_fraction: float) -> dict[str, list[str]]:
    """Deterministic split of relative paths into ``{"train": [...], "test": [...]}``
    (each sorted) by path hash; see the module docstring for the tiny-folder rule."""
    keys = {f: hash_fraction(f) for f in files}
    test = {f for f in files if keys[f] < test_fraction}
    if len(files) >= 2 and test_fraction > 0:
        if not test:
            test = {min(files, key=lambda f: (keys[f], f))}
        elif len(test) == len(files):
            test.discard(max(files, key=lambda f: (keys[f], f)))
    return {
        "train": [f for f in files if f not in test],
        "test": [f for f in files if f in test],
    }


def write_example_images(folder: Path, count: int = 8) -> list[Path]:
    """Write ``count`` small PNG/JPEG crops of scikit-image's bundled photographs
    (various sizes, RGB and grey) into ``folder``; return their paths."""
    from vqkit.components.natural_patches import SOURCES, skimage_data_dir

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(SOURCES)
    paths = []
    for k in range(count):
        with Image.open(skimage_data_dir() / SOURCES[names[k % len(names)]]) as src:
            img = src.convert("RGB" if k % 3 else "L")
        w, h = 40 + 7 * k, 36 + 5 * (k % 4)
        img = img.crop((10 * k, 5 * k, 10 * k + 3 * w, 5 * k + 3 * h)).resize((w, h))
        path = folder / ("sub" if k % 2 else "") / f"img{k:02d}.{'jpg' if k % 4 == 3 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        paths.append(path)
    return paths


class ImageFolder(Dataset):
    """Every PNG/JPEG under a folder, resized and cropped; split by hashed file path.

    Items are float32 ``(channels, H, W)`` in ``[-1, 1]`` with ``(H, W) = image_size``.
    :attr:`files` lists the item files (relative to ``root``) in item order.
    """

    Params = ImageFolderParams

    def __init__(self, params: ImageFolderParams, *, split: str = "train", seed: int = 0):
        super().__init__()
        self.params = params
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.seed = seed
        self.epoch = 0
        size = params.image_size
        self.image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.channels = params.channels
        self.root = Path(params.root).expanduser()
        if not self.root.is_dir():
            raise VqkitError(
                f"image folder {str(self.root)!r} does not exist or is not a folder; "
                "set the dataset's `root` param to a folder of images"
            )
        files = list_images(self.root, params.extensions)
        if not files:
            raise VqkitError(
                f"no images found under {str(self.root)!r} (searched recursively for "
                f"{', '.join(params.extensions)}); add images or change `extensions`"
            )
        self.files: list[str] = split_files(files, params.test_fraction)[split]
        if params.limit is not None:
            self.files = self.files[: params.limit]
        if split == "train" and not self.files:
            raise VqkitError(f"the train split of {str(self.root)!r} is empty ({len(files)} files)")
        self._random = split == "train" and params.fit == "crop" and params.train_crop == "random"
        self._flip = split == "train" and params.hflip
        self._cache: list[torch.Tensor | None] = [None] * len(self.files)
        self._stacked: torch.Tensor | None = None
        self._preload()

    @classmethod
    def example_params(cls, workdir: Path) -> ImageFolderParams:
        """Params over a small folder of real photographs written under ``workdir``
        (used by the contract checks and tests)."""
        folder = Path(workdir) / "image-folder-example"
        write_example_images(folder)
        return cls.Params(root=str(folder), image_size=32, test_fraction=0.25)

    # -- loading ----------------------------------------------------------------------
    def _resized(self, i: int) -> torch.Tensor:
        """uint8 ``(C, h, w)``: file ``i`` resized to cover :attr:`image_size` (or stretched)."""
        cached = self._cache[i]
        if cached is not None:
            return cached
        th, tw = self.image_size
        side = max(th, tw)  # EXIF rotation may swap the sides after drafting
        img = open_image(self.root / self.files[i], self.channels, draft_size=(side, side))
        if self.params.fit == "stretch":
            h, w = th, tw
        else:
            h, w = cover_size((img.height, img.width), (th, tw))
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        return pil_to_uint8(img)

    def _preload(self) -> None:
        budget = self.params.preload_mb * 2**20
        th, tw = self.image_size
        if not self.files or len(self.files) * self.channels * th * tw > budget:
            return
        workers = min(4, os.cpu_count() or 1)
        used = 0.0
        bad: list[str] = []
        with ThreadPoolExecutor(workers) as pool:
            for i, tensor in enumerate(pool.map(self._decoded, range(len(self.files)))):
                if isinstance(tensor, str):
                    bad.append(tensor)
                elif used + tensor.numel() <= budget:
                    self._cache[i] = tensor
                    used += tensor.numel()
        if bad:  # every file that cannot be decoded, not only the first
            raise bad_images_error(bad)
        if not self._random and not self._flip and all(t is not None for t in self._cache):
            self._stacked = torch.stack([self._crop(t, None) for t in self._cache])  # type: ignore[arg-type]

    def _crop(self, tensor: torch.Tensor, gen: np.random.Generator | None) -> torch.Tensor:
        th, tw = self.image_size
        top, left = crop_offsets((tensor.shape[1], tensor.shape[2]), (th, tw), gen)
        return tensor[:, top: top + th, left: left + tw]

    def _item_uint8(self, i: int) -> torch.Tensor:
        if self._stacked is not None:
            return self._stacked[i]
        gen = rng(self.seed, self.epoch, i) if (self._random or self._flip) else None
        out = self._crop(self._resized(i), gen if self._random else None)
        if self._flip and bool(gen.integers(0, 2)):  # type: ignore[union-attr]
            out = out.flip(-1)
        return out

    def check(self) -> None:
        """Decode every file of this split (``vqkit validate --build``): files that are not
        preloaded are otherwise decoded only when training reads them. Raises one
        :class:`VqkitError` naming every file that cannot be decoded."""
        def decode(i: int) -> str | None:
            if self._stacked is not None or self._cache[i] is not None:
                return None  # decoded at construction
            out = self._decoded(i)
            return out if isinstance(out, str) else None

        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            bad = [msg for msg in pool.map(decode, range(len(self.files))) if msg]
        if bad:
            raise bad_images_error(bad)

    def _decoded(self, i: int) -> torch.Tensor | str:
        """:meth:`_resized`, or the message of the user error it raised."""
        try:
            return self._resized(i)
        except VqkitError as exc:
            return str(exc)

    # -- Dataset --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the random crops / mirrors of ``epoch`` (train split only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} images")
        return to_float(self._item_uint8(i % len(self)))

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """float32 ``(B, C, H, W)`` in ``[-1, 1]`` for the given item indices."""
        idx = [int(i) for i in indices]
        if self._stacked is not None:
            return to_float(self._stacked.index_select(0, torch.as_tensor(idx, dtype=torch.long)))
        return to_float(torch.stack([self._item_uint8(i) for i in idx]))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Batched item access used by ``DataLoader``."""
        if self._stacked is not None:
            idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
            return float_items(self._stacked.index_select(0, idx))
        return [to_float(self._item_uint8(int(i))) for i in indices]


@hookimpl
def vqkit_register_datasets(register):
    register("image-folder", ImageFolder)
