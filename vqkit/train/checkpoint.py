"""Checkpoints: one file per save, written atomically, loaded safely.

A checkpoint is a plain dictionary saved with :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``: it holds tensors, numbers, strings, lists and
dicts only (RNG states are converted to tensors and lists). Keys written by the trainer:

``format`` (int), ``step`` (optimizer steps done), ``recipe`` (normalized recipe dict),
``model``, ``optimizers``, ``schedulers``, ``discriminator``, ``scaler``, ``codebook``
(code-book manager: reset policy and monitor), ``rng`` (:func:`capture_rng`), ``run``
(MLflow run id / tracking URI / run dir) and ``vqkit_version``.

Writes go to a temporary file in the same folder, are flushed and ``fsync``-ed, then
``os.replace``-d over the target, so a crash never leaves a half-written checkpoint
under the final name.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqkit.errors import VqkitError

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng",
    "restore_rng",
    "latest_checkpoint",
    "write_latest",
    "prune_checkpoints",
]

FORMAT = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
LATEST = "latest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU.

    Raises :class:`VqkitError` when the file is missing, truncated or not a vqkit checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise VqkitError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # a file that is not a torch checkpoint (e.g. a plain pickle) makes the safe
            # unpickler warn before it fails; the failure is what we report
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, IndexError,
            ValueError, OSError) as exc:
        detail = (str(exc).strip().splitlines() or ["file is empty or truncated"])[0]
        raise VqkitError(f"cannot read checkpoint {path}: {type(exc).__name__}: {detail[:300]}") from None
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise VqkitError(f"{path} is not a vqkit checkpoint (no 'format'/'model' keys)")
    if state["format"] > FORMAT:
        raise VqkitError(
            f"{path} was written by a newer vqkit (checkpoint format {state['format']}, "
            f"this vqkit reads {FORMAT}); upgrade vqkit"
        )
    return state


# --------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- files in a run
def step_file(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def write_latest(folder: Path, file: Path, step: int) -> None:
    """Record ``file`` (inside ``folder``) as the newest checkpoint, atomically."""
    text = json.dumps({"file": file.name, "step": int(step)}).encode()
    _atomic_write(folder / LATEST, lambda f: f.write(text))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``folder`` (a run's ``checkpoints/``), or ``None``."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["file"]
            if (folder / name).is_file():
                return folder / name
        except (ValueError, KeyError, TypeError):
            pass
    steps = sorted(
        (int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))
    )
    if steps:
        return steps[-1][1]
    final = folder / "final.pt"
    return final if final.is_file() else None


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_*.pt`` files; return the deleted ones."""
    steps = sorted(
        (int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))
    )
    doomed = [p for _, p in steps[:-keep]] if keep > 0 else [p for _, p in steps]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
