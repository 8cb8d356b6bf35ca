"""A sweep whose grid sets ``tracking.run_name`` names its children with those values
(followed by the values of the keys not linked with it), not ``run_name=... key=...``."""
from __future__ import annotations

import shutil

import pytest
import yaml

from vqkit.cli import main
from vqkit.testing.sweeps import TINY_RECIPE

pytest_plugins = ("trainkit",)  # fixtures: mlflow_template


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_template):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


def dry_run_names(workdir, capsys, sweep: dict) -> list[str]:
    recipe = workdir / "named.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "sweep": sweep}, sort_keys=False))
    assert main(["sweep", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    return [line.split("  ", 1)[1] for line in out.splitlines() if "/" in line.split("  ", 1)[0]]


def test_linked_run_names_name_the_children(workdir, capsys):
    names = dry_run_names(workdir, capsys, {
        "grid": {"tracking.run_name": ["slow", "fast"], "train.lr": [0.001, 0.002], "reset.name": ["none", "jukebox"]},
        "link": [["tracking.run_name", "train.lr"]]})
    # the crossed key still shows, so no two children share a name; the linked one does not
    assert names == ["slow reset=none", "slow reset=jukebox", "fast reset=none", "fast reset=jukebox"]


def test_run_names_alone_are_the_whole_names(workdir, capsys):
    names = dry_run_names(workdir, capsys, {
        "grid": {"tracking.run_name": ["a-run", "b-run"], "train.lr": [0.001, 0.002]},
        "link": [["tracking.run_name", "train.lr"]]})
    assert names == ["a-run", "b-run"]
