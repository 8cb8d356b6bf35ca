"""Helpers shared by the training and tracking tests (a pytest plugin: ``pytest_plugins =
("trainkit",)``): a pre-migrated MLflow sqlite store (creating one runs MLflow's migrations,
seconds each time), an isolated working directory, an MLflow client and a deep comparison of
checkpoint states."""
from __future__ import annotations

import shutil
import socket

import pytest
import torch


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


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
