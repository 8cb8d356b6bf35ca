"""Helpers for testing sweeps end to end (vqkit's tests and the launcher/search plugins'):
a tiny recipe that trains in seconds on Fashion-MNIST, a fresh MLflow sqlite store, and the
sweep's parent and child runs read back through MLflow's own client."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["TINY_RECIPE", "write_recipe", "sqlite_store", "sweep_runs"]

#: a recipe of 4 steps on 96 Fashion-MNIST images (seconds on one CPU core)
TINY_RECIPE: dict[str, Any] = {
    "vqkit": 1,
    "name": "tiny",
    "seed": 3,
    "data": {"name": "fashion-mnist", "params": {"limit": 96}},
    "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 8}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
    "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
    "losses": [{"name": "pixel-l1"}],
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "eval_every": 4, "image_every": 4,
              "checkpoint_every": 4, "device": "cpu"},
    "eval": {"num_samples": 16, "batch_size": 16},
    "tracking": {"experiment": "sw"},
}


def write_recipe(folder: Path, name: str = "tiny.yaml", **over: Any) -> Path:
    """``TINY_RECIPE`` with top-level keys replaced by ``over``, written to ``folder/name``."""
    path = Path(folder) / name
    path.write_text(yaml.safe_dump({**TINY_RECIPE, **over}, sort_keys=False), encoding="utf-8")
    return path


def sqlite_store(folder: Path) -> str:
    """A migrated MLflow sqlite store ``folder/mlflow.db`` (the default store of a recipe run
    from ``folder``); returns its URI."""
    from mlflow import MlflowClient

    from vqkit.tracking import _quiet_mlflow_logs

    path = Path(folder) / "mlflow.db"
    _quiet_mlflow_logs()
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return f"sqlite:///{path}"


def sweep_runs(uri: str, experiment: str = "sw"):
    """``(parents, children)`` of the experiment's sweeps, as MLflow ``Run`` objects."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    parents = [r for r in runs if r.data.tags.get("vqkit.sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children
