"""Distributed data parallel helpers (torchrun / DDP).

``init_distributed`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and initialises a process group:
``gloo`` on CPU, ``nccl`` on CUDA. Without those variables (or with ``WORLD_SIZE=1``) it
returns a disabled :class:`DistContext` whose collectives are identities, so the trainer
calls them unconditionally.

Only rank 0 (:attr:`DistContext.is_main`) logs to MLflow and writes checkpoints.
Data are sharded by :class:`vqkit.train.data.StepBatches` (rank r takes the r-th slice of a step).
The training loop (:mod:`vqkit.train.loop`) holds the context of a run.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as torch_dist

from vqkit.errors import VqkitError

__all__ = ["DistContext", "init_distributed", "resolve_device"]


def resolve_device(device_str: str, local_rank: int = 0) -> torch.device:
    """Turn a recipe ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device.

    ``auto`` picks ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; plain
    ``cuda`` under torchrun means ``cuda:<local_rank>``.
    """
    text = (device_str or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VqkitError(
                f"train.device is {device_str!r} but CUDA is not available in this torch "
                f"build ({torch.__version__}); use --set train.device=cpu"
            )
        if text == "cuda":
            return torch.device("cuda", local_rank)
        try:
            index = int(text.split(":", 1)[1])
        except (IndexError, ValueError):
            raise VqkitError(f"train.device {device_str!r} is not valid (auto, cpu, cuda or cuda:N)") from None
        if index >= torch.cuda.device_count():
            raise VqkitError(
                f"train.device {device_str!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device("cuda", index)
    raise VqkitError(f"train.device {device_str!r} is not valid (auto, cpu, cuda or cuda:N)")


@dataclasses.dataclass
class DistContext:
    """Where this process sits in a (possibly trivial) process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints (rank 0)."""
        return self.rank == 0

    # -- collectives (identities when not enabled) ------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device the backend communicates on."""
        if torch_dist.get_backend() == "nccl":
            return t.to(self.device)
        return t.cpu()

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every rank along dim 0 (rank order).

        Sizes along dim 0 may differ between ranks; the other dims must agree. The result
        is on ``t``'s device. Identity when not distributed.
        """
        if not self.enabled:
            return t
        src = self._comm(t.contiguous())
        n = torch.tensor([src.shape[0]], dtype=torch.int64, device=src.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        torch_dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        if src.shape[0] < longest:
            pad = torch.zeros((longest - src.shape[0], *src.shape[1:]), dtype=src.dtype, device=src.device)
            src = torch.cat([src, pad], dim=0)
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, src)
        out = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
        return out.to(t.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (returned; ``t`` itself is not modified)."""
        if not self.enabled:
            return t
        buf = self._comm(t.detach().clone())
        torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
        return buf.to(t.device)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks."""
        if not self.enabled:
            return t
        return self.all_reduce_sum(t) / self.world_size

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` as held by rank ``src``, on every rank (shape and dtype must agree)."""
        if not self.enabled:
            return t
        buf = self._comm(t.detach().clone().contiguous())
        torch_dist.broadcast(buf, src=src)
        return buf.to(t.device)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """A picklable Python object as held by rank ``src``."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a NaN loss)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self, barrier: bool = False) -> None:
        """Destroy the process group (idempotent).

        ``barrier``: first wait until every rank gets here (after a normal end of training).
        Without it, a rank that tears its connections down while another is still busy
        (rank 0 finishing the MLflow run) could abort in gloo's background threads
        ("terminate called without an active exception"). Error paths skip the barrier: the
        other ranks may never arrive.
        """
        if self.enabled and torch_dist.is_initialized():
            if barrier:
                torch_dist.barrier()
            torch_dist.destroy_process_group()
        self.enabled = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise VqkitError(f"environment variable {name}={raw!r} must be an integer") from None


def init_distributed(device_str: str = "auto") -> DistContext:
    """Set up this process from the torchrun environment.

    Without ``WORLD_SIZE`` > 1 this returns a single-process context on the device
    resolved from ``device_str``. Otherwise it joins the process group (``gloo`` on CPU,
    ``nccl`` on CUDA; ``MASTER_ADDR``/``MASTER_PORT`` from the environment) and selects
    ``cuda:LOCAL_RANK`` on CUDA.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world <= 1:
        return DistContext(0, 1, 0, resolve_device(device_str, 0), False)
    device = resolve_device(device_str, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch_dist.is_available():
        raise VqkitError("torch.distributed is not available in this torch build")
    if not torch_dist.is_initialized():
        kwargs = {"backend": backend, "rank": rank, "world_size": world}
        if backend == "nccl":
            kwargs["device_id"] = device
        torch_dist.init_process_group(**kwargs)
    return DistContext(rank, world, local, device, True)
