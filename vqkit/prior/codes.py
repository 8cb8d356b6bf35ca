"""The codes of an autoencoder's train and test splits, computed once and cached.

The frozen autoencoder (eval mode) encodes every image of both splits of the data set
named in its own recipe; the indices (and the data set's class labels when it has
``labels``) are saved as ``<cache_dir>/<sha256 of the checkpoint file>.pt``. The key is
the checkpoint's content, so a changed checkpoint (more training, another run) is never
served stale codes: its digest names another file. The file also records the digest, and
a file whose digest does not match its name is recomputed. Writers take a file lock, so two
processes asking for the same codes compute them once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from vqkit.errors import VqkitError

__all__ = ["CodeSet", "file_sha256", "load_or_compute_codes", "encode_split"]

CACHE_FORMAT = 1


@dataclasses.dataclass
class CodeSet:
    """Codes of both splits: ``train`` / ``test`` int64 ``(N, *grid)``; labels int64 ``(N,)`` or
    ``None``; ``num_classes`` is ``max label + 1`` (0 without labels)."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    codebook_size: int
    sha256: str
    path: Path | None = None
    computed: bool = False

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.train_labels is None:
            return 0
        top = int(self.train_labels.max())
        if self.test_labels is not None and len(self.test_labels):
            top = max(top, int(self.test_labels.max()))
        return top + 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def encode_split(model, dataset, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int64 codes ``(N, *grid)`` of every item of ``dataset`` and its labels (or ``None``)."""
    from vqkit.train.data import read_batch

    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(len(dataset), start + batch_size))
        x = read_batch(dataset, idx).to(device)
        out.append(model.encode(x).indices.to("cpu", torch.int64))
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != len(dataset):
            raise VqkitError(f"data set labels: {labels.shape[0]} labels for {len(dataset)} images")
    return torch.cat(out), labels


def _small(codes: torch.Tensor, k: int) -> torch.Tensor:
    return codes.to(torch.int16) if k <= 32767 else codes.to(torch.int32)


def load_or_compute_codes(
    checkpoint: str | os.PathLike,
    cache_dir: str | os.PathLike,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    say: Callable[[str], None] | None = None,
    sha256: str | None = None,
) -> CodeSet:
    """The :class:`CodeSet` of the autoencoder checkpoint, from the cache or computed."""
    from filelock import FileLock

    from vqkit.train.checkpoint import save_checkpoint

    checkpoint = Path(checkpoint)
    digest = sha256 or file_sha256(checkpoint)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{digest}.pt"
    with FileLock(str(path) + ".lock"):
        cached = _read(path, digest)
        if cached is not None:
            return cached
        from vqkit.model import VQModel
        from vqkit.train.build import build_datasets

        if say:
            say(f"vqkit: computing the codes of {checkpoint} (train and test splits; cached in {path})")
        device = torch.device(device)
        model, recipe = VQModel.from_checkpoint(checkpoint, map_location=device)
        train, test = build_datasets(recipe)
        k = model.codebook_size
        train_codes, train_labels = encode_split(model, train, batch_size, device)
        test_codes, test_labels = encode_split(model, test, batch_size, device)
        state = {
            "format": CACHE_FORMAT,
            "sha256": digest,
            "checkpoint": str(checkpoint.resolve()),
            "codebook_size": k,
            "train": _small(train_codes, k),
            "test": _small(test_codes, k),
            "train_labels": train_labels,
            "test_labels": test_labels,
        }
        save_checkpoint(path, state)  # atomic: temp file, fsync, rename
    return CodeSet(train_codes, test_codes, train_labels, test_labels, k, digest, path, computed=True)


def _read(path: Path, digest: str) -> CodeSet | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT or state.get("sha256") != digest:
        return None
    return CodeSet(
        state["train"].to(torch.int64), state["test"].to(torch.int64),
        state.get("train_labels"), state.get("test_labels"), int(state["codebook_size"]),
        digest, path, computed=False,
    )
