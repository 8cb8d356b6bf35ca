"""vqkit-submitit: the launcher contract, and a 4-child sweep of tiny recipes through
submitit's local executor, read back from the tracking store."""
from __future__ import annotations

from pathlib import Path

import pytest
from vqkit_submitit import SubmititLauncher

from vqkit.cli import main
from vqkit.plugins import get_registry
from vqkit.testing import contract_checks
from vqkit.testing.sweeps import sqlite_store, sweep_runs, write_recipe

CHECKS = contract_checks("launchers")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(SubmititLauncher)


def test_registered_through_its_entry_point():
    entry = get_registry().get("launchers", "submitit")
    assert entry.cls is SubmititLauncher and entry.distribution == "vqkit-submitit"


def test_four_children_as_jobs_of_the_local_executor(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path, sweep={
        "grid": {"quantizer.params.codebook_size": [8, 16], "reset.name": ["none", "random"]},
        "launcher": {"name": "submitit", "params": {"cluster": "local", "folder": "jobs", "poll_s": 0.2}},
        "jobs": 2,
    })
    assert main(["sweep", str(recipe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    (parent,), children = sweep_runs(uri)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["vqkit.sweep.launcher"] == "submitit"
    # every child was a submitit job (its pickled call and result in the executor's folder)
    assert out.count("submitted as job") == 4 and "(local)" in out
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 4
    logs = sorted((tmp_path / "runs" / parent.info.run_id / "children").glob("*.log"))
    assert len(logs) == 4 and all("MLflow run" in p.read_text() for p in logs)
    # the executor's work is over: no job process of its folder is left on this machine
    folder = str(tmp_path / "jobs")
    left = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "submitit" in cmd and folder in cmd:
            left.append(cmd)
    assert not left, left
