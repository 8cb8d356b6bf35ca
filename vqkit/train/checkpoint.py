"""Checkpoints: one file per save, written atomically, loaded safely.

A checkpoint is a plain dictionary saved with :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``: it holds tensors, numbers, strings, lists and
dicts only (RNG states are converted to tensors and lists). Keys written by the training
loop (:meth:`vqkit.train.loop.TrainLoop.state`):

``format`` (int), ``family`` (``autoencoder`` or ``prior``; absent in autoencoder
checkpoints written before the loop was shared), ``step`` (optimizer steps done),
``recipe`` (normalized recipe dict), ``rng`` (:func:`capture_rng`), ``run`` (MLflow run id
/ tracking URI / run dir), ``vqkit_version``, ``pending`` and ``window`` (the interrupted
evaluation, the terms summed since the last logged step), and the family's own: for an autoencoder
``model``, ``optimizers``, ``schedulers``, ``scalers``, ``discriminator``, ``lecam`` (LeCam's
anchors, or None), ``codebook``
(code-book manager: reset policy and monitor), ``data``, ``channels``, ``image_size``; for
a prior ``model``, ``optimizers``, ``schedulers``, ``scalers``, ``prior``, ``autoencoder``.

Writes go to a temporary file in the same folder, are flushed and ``fsync``-ed, then
``os.replace``-d over the target, so a crash never leaves a half-written checkpoint
under the final name; temp files a crash leaves behind are removed by
:func:`remove_temp_files` when a run starts or resumes. A write that fails (``ENOSPC``,
read-only file system, permissions) raises the ``OSError`` with the checkpoint's path,
after removing its temp file: the previous checkpoints are untouched.

Integrity: since format 2, each file holds ``digest`` = ``{"sha256": ...}``, the SHA-256
of its whole content (every tensor's dtype, shape and bytes, every key and value), and
:func:`load_checkpoint` refuses a file whose content no longer matches it (flipped bytes
inside a tensor load without complaint otherwise). Files that are not PyTorch zip
archives, or not vqkit's, are refused as "not a vqkit checkpoint".

The newest checkpoint of a folder is the complete file with the highest step
(:func:`checkpoint_candidates`): ``latest.json`` is written after each file, but a kill
between the two must not send a resume back to the previous file.
"""
from __future__ import annotations

import hashlib
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
    "content_digest",
    "checkpoint_candidates",
    "newest_intact",
    "remove_temp_files",
]

#: 2: with a content digest; format-1 files (no digest) are still read
FORMAT = 2
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


class _Recording:
    """A file wrapper remembering the first ``OSError`` of a write: torch's zip writer
    turns it into ``RuntimeError: unexpected pos``, which names neither file nor cause."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temp file, fsync, rename over ``path``.

    Any ``OSError`` (including one torch reports as a ``RuntimeError``) is raised as an
    ``OSError`` whose ``filename`` is ``path``; the temp file is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    recording = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except RuntimeError:
        if recording is not None and recording.error is not None:
            exc = recording.error
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - the folder went away
            pass
    _fsync_dir(path.parent)


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            h.update(f"K{key!r}:".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (its ``digest`` key left out): tensors by dtype,
    shape and bytes, containers and scalars by value, so it survives a pickle round trip."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with its content digest to ``path`` atomically (temp file + fsync
    + rename). Raises ``OSError`` (``filename``: ``path``) when the file system refuses."""
    path = Path(path)
    state = {**state, "digest": {"sha256": content_digest(state)}}
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def _torch_archive_start(path: Path) -> bool:
    """Whether ``path`` begins like a ``torch.save`` zip archive: a first local file header
    (``PK\\x03\\x04``) naming ``<folder>/data.pkl`` (the start of a file cut short)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(30 + 1024)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return False
    (name_len,) = struct.unpack("<H", head[26:28])
    name = head[30:30 + name_len]
    return len(name) == name_len and name.endswith(b"/data.pkl")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU.

    Raises :class:`VqkitError` when the file is missing, truncated, damaged (its content
    does not match its digest) or not a vqkit checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise VqkitError(f"checkpoint not found: {path}")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise VqkitError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not is_zip:
        size = path.stat().st_size
        if _torch_archive_start(path):
            raise VqkitError(f"{path} is truncated or damaged: a PyTorch checkpoint archive cut short ({size} "
                             "bytes, no end of archive; e.g. a copy or download that did not finish)")
        what = "an empty file" if size == 0 else f"{size} bytes that are not a PyTorch zip archive"
        raise VqkitError(f"{path} is not a vqkit checkpoint ({what})")
    try:
        with warnings.catch_warnings():
            # a file that is not a torch checkpoint (e.g. a plain pickle) makes the safe
            # unpickler warn before it fails; the failure is what we report
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, IndexError,
            ValueError, OSError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        # a damaged or foreign file: whatever the unpickler tripped on, the user must act
        detail = (str(exc).strip().splitlines() or ["file is empty or truncated"])[0]
        raise VqkitError(f"cannot read checkpoint {path} (damaged, or not a vqkit checkpoint): "
                         f"{type(exc).__name__}: {detail[:300]}") from None
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise VqkitError(f"{path} is not a vqkit checkpoint (no 'format'/'model' keys)")
    if not isinstance(state["format"], int):
        raise VqkitError(f"{path} is not a vqkit checkpoint ('format' is {state['format']!r})")
    if state["format"] > FORMAT:
        raise VqkitError(
            f"{path} was written by a newer vqkit (checkpoint format {state['format']}, "
            f"this vqkit reads {FORMAT}); upgrade vqkit"
        )
    if state["format"] >= 2:
        digest = state.get("digest")
        expected = digest.get("sha256") if isinstance(digest, dict) else None
        if expected is None:
            raise VqkitError(f"checkpoint {path} is damaged: it has no content digest")
        if content_digest(state) != expected:
            raise VqkitError(
                f"checkpoint {path} is damaged: its content does not match the SHA-256 digest "
                "written with it (bytes changed on disk or in a copy)"
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


def _peek_step(path: Path) -> int | None:
    """The ``step`` of a checkpoint without reading its tensors (memory-mapped load)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # damaged or foreign: load_checkpoint says why when it is tried
        return None


def checkpoint_candidates(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files of ``folder`` (a run's ``checkpoints/``), newest first: by step
    (from ``step_<N>.pt`` names, ``latest.json`` and the step inside ``final.pt``), a
    ``final.pt`` first among equals. Nothing is verified here."""
    folder = Path(folder)
    steps: dict[Path, int] = {}
    for p in folder.glob("step_*.pt"):
        if m := _STEP_FILE.match(p.name):
            steps[p] = int(m.group(1))
    pointer = folder / LATEST
    if pointer.is_file():
        try:
            info = json.loads(pointer.read_text())
            target = folder / info["file"]
            if target.is_file() and target not in steps and target.name != "final.pt":
                steps[target] = int(info["step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    final = folder / "final.pt"
    if final.is_file():
        peeked = _peek_step(final)
        steps[final] = peeked if peeked is not None else -1
    return [p for p, _ in sorted(steps.items(), key=lambda kv: (kv[1], kv[0].name == "final.pt"), reverse=True)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint file in ``folder`` (a run's ``checkpoints/``), or ``None``."""
    found = checkpoint_candidates(folder)
    return found[0] if found else None


def newest_intact(folder: str | os.PathLike, warn=None) -> tuple[Path, dict[str, Any]] | None:
    """``(path, state)`` of the newest checkpoint of ``folder`` that loads and matches its
    digest, or ``None`` when the folder has none. Each damaged newer file is reported
    through ``warn(message)`` (skipped); when every file is damaged the problems of all
    are raised as one :class:`VqkitError`."""
    problems = []
    for path in checkpoint_candidates(folder):
        try:
            state = load_checkpoint(path)
        except VqkitError as exc:
            problems.append(str(exc))
            continue
        for text in problems:
            if warn is not None:
                warn(f"{text}; skipped: resuming from {path}, the newest intact checkpoint")
        return path, state
    if problems:
        raise VqkitError("no intact checkpoint in " + f"{folder}: " + "; ".join(problems))
    return None


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files (``.<name>.tmp-<pid>``, ``.<name>.tmp``) a crash left in a
    run's checkpoint folder; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    doomed = [p for p in folder.glob(".*.tmp*") if p.is_file() and re.match(r"^\..+\.tmp(-\d+)?$", p.name)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_*.pt`` files; return the deleted ones."""
    steps = sorted(
        (int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))
    )
    doomed = [p for _, p in steps[:-keep]] if keep > 0 else [p for _, p in steps]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
