"""Helpers shared by the trainer and tracking tests: a pre-migrated MLflow sqlite store
(creating one runs MLflow's migrations, seconds each time) and tiny recipes."""
from __future__ import annotations

import shutil
import socket

import pytest


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
