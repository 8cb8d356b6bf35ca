"""Deterministic, resumable batches: the data order is a pure function of the step.

Epoch ``e`` visits the train set in the order ``randperm(N)`` drawn from a generator seeded
by ``(seed, e)``. Each optimizer step consumes one *global* batch of
``batch_size x world_size`` consecutive positions of that order (the incomplete tail of an
epoch is dropped); rank ``r`` takes the ``r``-th slice of ``batch_size``. So step ``s``
always sees the same images, whether the run was resumed or not, and the ranks of a
distributed run see disjoint shards.

Two ways to read a batch:

* in-process fast path (``train.num_workers: 0`` and the data set has ``get_batch``): one
  vectorized call per step, no worker processes;
* a :class:`torch.utils.data.DataLoader` with ``num_workers`` processes fed by a batch
  sampler over the same indices (for data sets that decode files). A user error raised
  in a worker (a corrupt image file: :class:`VqkitError`, or an ``OSError`` naming a
  file) comes back as that error, not wrapped in the worker's traceback.

Data sets with ``set_epoch(epoch)`` (random crops / flips per epoch) are told the epoch
before its batches are read.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch

from vqkit.errors import Problem, VqkitError
from vqkit.interfaces import Dataset

__all__ = ["StepBatches", "read_batch", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as
    PyTorch's DataLoader counts them), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def read_batch(dataset: Dataset, indices: list[int] | torch.Tensor) -> torch.Tensor:
    """float32 ``(B, C, H, W)`` for ``indices`` (uses ``get_batch`` when available)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    idx = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return torch.stack([dataset[i] for i in idx])


class _WorkerFailure:
    """What a worker returns instead of a batch when reading it raised a user error."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems


class _Guarded(torch.utils.data.Dataset):
    """A data set whose user errors travel back from DataLoader workers intact (the
    DataLoader rebuilds a worker's exception from its text, traceback included)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]):
        try:
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(indices)
            return [self.dataset[i] for i in indices]
        except VqkitError as exc:
            return [_WorkerFailure(exc.problems)]
        except OSError as exc:
            if exc.filename is None:
                raise
            return [_WorkerFailure([Problem(f"cannot read {exc.filename}: {exc.strerror or exc}")])]


def _collate(items: list):
    for item in items:
        if isinstance(item, _WorkerFailure):
            return item
    return torch.utils.data.default_collate(items)


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler: the index lists of steps ``[first, last)`` of one epoch for one rank."""

    def __init__(self, owner: "StepBatches", first: int, last: int):
        self.owner, self.first, self.last = owner, first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first, self.last):
            yield self.owner.indices(step).tolist()


class StepBatches:
    """The batches of steps ``start, start+1, ...`` of a run, for one rank.

    Args:
        dataset: the train split.
        batch_size: images per step per rank.
        seed: recipe seed.
        rank, world_size: this process's place in the process group.
        num_workers: data-loader worker processes (0: read in this process); more than
            :func:`usable_cpus` start only that many (the batches are the same: the order is
            the sampler's), said once through ``note``.
        note: called with one line when the workers are capped (``None``: said nowhere).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, note: Callable[[str], None] | None = None):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_workers = int(num_workers)
        cpus = usable_cpus()
        if self.num_workers > cpus:
            if note is not None:
                note(f"vqkit: note: train.num_workers is {self.num_workers} but this process may use "
                     f"{cpus} CPU{'s' if cpus != 1 else ''}: {cpus} data-loader worker{'s' if cpus != 1 else ''}")
            self.num_workers = cpus
        n = len(dataset)
        global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise VqkitError(
                Problem(
                    f"the train split has {n} images, fewer than one global batch "
                    f"({self.batch_size} x {self.world_size} processes = {global_batch}); "
                    "lower train.batch_size or use more data",
                    path="train.batch_size",
                )
            )
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """int64 ``(batch_size,)`` item indices of ``step`` for this rank."""
        epoch, b = divmod(step, self.steps_per_epoch)
        start = (b * self.world_size + self.rank) * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]

    def _set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def iterate(self, start: int, stop: int) -> Iterator[torch.Tensor]:
        """Batches float32 ``(B, C, H, W)`` of steps ``start .. stop-1`` in order."""
        step = start
        while step < stop:
            epoch = self.epoch_of(step)
            self._set_epoch(epoch)
            end = min(stop, (epoch + 1) * self.steps_per_epoch)
            if self.num_workers == 0:
                for s in range(step, end):
                    yield read_batch(self.dataset, self.indices(s))
            else:
                loader = torch.utils.data.DataLoader(
                    _Guarded(self.dataset),
                    batch_sampler=_EpochBatches(self, step, end),
                    num_workers=self.num_workers,
                    collate_fn=_collate,
                    pin_memory=False,
                )
                for batch in loader:
                    if isinstance(batch, _WorkerFailure):
                        raise VqkitError(batch.problems)
                    yield batch
            step = end
