"""Process-wide settings of a training process (``vqkit train`` applies them).

* :func:`cpu_friendly_threads`: idle OpenMP threads sleep instead of spinning.
* :func:`keep_freed_memory`: glibc's ``malloc`` keeps freed memory for reuse.
* :func:`sigterm_as_interrupt`: SIGTERM ends a run or a sweep as Ctrl-C does.
"""
from __future__ import annotations

import ctypes
import os
import platform
import signal
import sys
import threading

__all__ = ["cpu_friendly_threads", "keep_freed_memory", "sigterm_as_interrupt", "KEEP_FREED_MEMORY_ENV"]

#: Set to ``0`` to leave glibc's allocator settings alone.
KEEP_FREED_MEMORY_ENV = "VQKIT_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit systems (``HEAP_MAX_SIZE / 2``).
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 30


def cpu_friendly_threads() -> None:
    """Let idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) unless the
    user chose a policy. On a CPU shared with other processes, spinning threads made small
    training steps 5-10x slower; with sleeping threads a 2-thread step stays about as fast
    as a 1-thread one under load. The price is the wake-up of every parallel region on an
    idle machine (quickstart step at K = 8192 on 2 vCPUs, ``benchmarks/quantizer.py
    --threads 2 --only-train-step``: 190 ms passive, 163 ms ``ACTIVE``, 160 ms libgomp's
    default; next to one busy process 349, 456 and 691 ms; docs/performance.md). A lone run
    on an idle machine can set ``OMP_WAIT_POLICY=ACTIVE``. Only effective before torch is
    first imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for the next allocation (Linux/glibc only).

    A training step allocates and frees the same tensors (activations, gradients, the
    quantizer's output) every step. With glibc's defaults, blocks of a few MiB are handed
    back to the kernel when freed, so the next step takes a page fault on every 4 KiB page
    it writes (a median of 12,000 faults per K=512, D=256 quantizer step in
    ``benchmarks/quantizer_breakdown.py``, 0 with this setting; the quickstart training
    step of ``benchmarks/quantizer.py --train-step`` got 15-20% faster than with
    ``--system-malloc``). Allocations below 32 MiB
    then come from the heap, which is no longer trimmed below 1 GiB: the process keeps its
    peak heap, as a GPU caching allocator does. ``VQKIT_KEEP_FREED_MEMORY=0`` turns it off.

    Returns whether the setting was applied.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok


def sigterm_as_interrupt():
    """Turn SIGTERM (schedulers, ``kill``) into KeyboardInterrupt, so a training run or a sweep
    ends as on Ctrl-C (a run checkpoints); returns the previous handler, for the caller to
    restore (``None`` outside the main thread, where nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


# =========================================================================== the run lock
#: held by the ``vqkit train`` process that trains a run (in its run dir), released by the
#: operating system when that process dies, even by ``kill -9``
RUN_LOCK = ".vqkit-train.lock"


def hold_run_lock(run_dir: str | os.PathLike):
    """Take the run lock of ``run_dir`` for this process; returns the held lock (release it,
    or let the process end), or ``None`` when another process holds it or it cannot be
    taken (e.g. a read-only folder)."""
    from filelock import FileLock, Timeout

    lock = FileLock(os.path.join(os.fspath(run_dir), RUN_LOCK), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except (Timeout, OSError):
        return None
    return lock


def run_in_progress(run_dir: str | os.PathLike) -> bool:
    """Whether a live process holds the run lock of ``run_dir`` (is training that run)."""
    if not os.path.exists(os.path.join(os.fspath(run_dir), RUN_LOCK)):
        return False
    lock = hold_run_lock(run_dir)
    if lock is None:
        return os.access(os.fspath(run_dir), os.W_OK)  # held (an unwritable folder tells nothing)
    lock.release()
    return False
