"""Helpers shared by the training and tracking tests (a pytest plugin: ``pytest_plugins =
("trainkit",)``): a pre-migrated MLflow sqlite store (creating one runs MLflow's migrations,
seconds each time), an isolated working directory, an MLflow client, a deep comparison of
checkpoint states and builders of tiny recipes."""
from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An empty, migrated MLflow sqlite database, created once per test process."""
    from mlflow import MlflowClient

    from vqkit.tracking import _quiet_mlflow_logs

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    _quiet_mlflow_logs()
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, mlflow_template, monkeypatch):
    """``sqlite:///<tmp_path>/mlflow.db``, a fresh copy of the template; HTTP retries off."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template, path)
    return f"sqlite:///{path}"


def free_port() -> int:
    """A local TCP port nothing listens on (at the time of the call)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    return free_port()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (the default MLflow store and runs/ go here); no
    ``MLFLOW_TRACKING_URI`` from the environment, HTTP retries off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return tmp_path


def client(uri: str):
    """An MLflow client of the store at ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_tensors_equal(a, b, where: str = "") -> None:
    """Assert that two (nested) checkpoint states are equal: tensors bit for bit with the
    same dtype, dicts with the same keys, lists of the same length, other values equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            all_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            all_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def tiny_recipe(data: dict, train: dict, eval: dict, *, name: str = "tiny", seed: int = 0,
                channels: tuple[int, ...] = (8, 8), codebook_size: int = 16, **top: Any) -> dict:
    """A recipe of a tiny conv VQ autoencoder on the CPU (encoder ``channels``, the decoder
    the reverse; factor 4, 8-dim latents, a ``codebook_size`` code book, pixel-l1 loss), with
    the ``data``, ``train`` (``device: cpu`` added) and ``eval`` blocks given; ``top``: more
    top-level keys (``tracking``, ...)."""
    return {
        "vqkit": 1, "name": name, "seed": seed, "data": data,
        "encoder": {"name": "conv", "params": {"channels": list(channels), "factor": 4, "latent_dim": 8}},
        "quantizer": {"name": "vq", "params": {"codebook_size": codebook_size}},
        "decoder": {"name": "conv", "params": {"channels": list(reversed(channels))}},
        "losses": [{"name": "pixel-l1"}],
        "train": {**train, "device": "cpu"},
        "eval": eval,
        **top,
    }


def image_folder_recipe(path: Path, root: Path, store: str, *, batch_size: int, num_workers: int,
                        **data_params: Any) -> Path:
    """Write to ``path`` a 2-step :func:`tiny_recipe` on the images of ``root`` (image-folder,
    32x32, a quarter held out for test, plus ``data_params``), evaluated by PSNR on 2 test
    images, named and logging to experiment ``path.stem`` of ``store``."""
    name = path.stem
    recipe = tiny_recipe(
        {"name": "image-folder", "params": {"root": str(root), "image_size": 32, **data_params, "test_fraction": 0.25}},
        {"steps": 2, "batch_size": batch_size, "num_workers": num_workers},
        {"num_samples": 2, "batch_size": 2, "metrics": ["psnr"]},
        name=name, tracking={"experiment": name, "uri": store},
    )
    path.write_text(yaml.safe_dump(recipe))
    return path


def located_at(recipe, *keys: str) -> str:
    """A regex for ``recipe:LINE:COL`` with LINE where the last of ``keys`` is set in the
    recipe file (each key searched for after the previous one's line; a key ending its line
    has its block on the next line, where the block is located): for problems located like
    validate's own."""
    lines = Path(recipe).read_text().splitlines()
    n = 0
    for key in keys:
        n = next(i for i in range(n, len(lines)) if key in lines[i])
    if lines[n].rstrip().endswith(keys[-1]) and keys[-1].endswith(":"):  # block style
        n += 1
    return re.escape(f"{recipe}:{n + 1}:") + r"\d+"
