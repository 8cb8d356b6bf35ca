"""vqkit-ray: the launcher contract, and a 4-child sweep of tiny recipes on a local Ray
instance of 2 CPUs, read back from the tracking store."""
from __future__ import annotations

import pytest
import ray
from vqkit_ray import RayLauncher

from vqkit.cli import main
from vqkit.plugins import get_registry
from vqkit.testing import contract_checks
from vqkit.testing.sweeps import sqlite_store, sweep_runs, write_recipe

CHECKS = contract_checks("launchers")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(RayLauncher)  # starts a local instance of 2 CPUs and shuts it down (close)
    assert not ray.is_initialized()


def test_registered_through_its_entry_point():
    entry = get_registry().get("launchers", "ray")
    assert entry.cls is RayLauncher and entry.distribution == "vqkit-ray"


def test_four_children_as_ray_tasks_on_two_cpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = main(["sweep", str(recipe), "--launcher", "ray", "--jobs", "4",
                     "--grid", "quantizer.params.codebook_size=8,16", "--grid", "reset.name=none,random"])
        assert code == 0, capsys.readouterr().err
        assert ray.is_initialized()  # the launcher used this connection and left it open
    finally:
        ray.shutdown()
    (parent,), children = sweep_runs(uri)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.info.run_name for r in children) == [
        "K=16 reset=none", "K=16 reset=random", "K=8 reset=none", "K=8 reset=random"]
    assert parent.info.status == "FINISHED" and parent.data.tags["vqkit.sweep.launcher"] == "ray"
    # 4 children were in flight (--jobs 4) but each declared 1 CPU: Ray ran at most 2 at once
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert 1 <= overlap <= 2, spans
    # each child's output came back from its task into the sweep's log folder
    logs = sorted((tmp_path / "runs" / parent.info.run_id / "children").glob("*.log"))
    assert len(logs) == 4 and all("MLflow run" in p.read_text() for p in logs)
