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


def _train_process(recipe) -> tuple[int, int] | None:
    """(pid, parent pid: its Ray worker) of this test's child (`vqkit train RECIPE`), if one runs;
    never another test's process."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"vqkit.cli" in cmd and b"train" in cmd and str(recipe).encode() in cmd:
            return int(proc.name), int(stat[1])
    return None


def test_a_lost_worker_leaves_the_child_resumable_and_the_sweep_rerunnable(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import threading
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path, train={"steps": 1000, "batch_size": 16, "log_every": 50, "eval_every": 1000,
                                           "image_every": 1000, "checkpoint_every": 2, "keep_checkpoints": 1,
                                           "device": "cpu"})
    argv = ["sweep", str(recipe), "--launcher", "ray", "--grid", "quantizer.params.codebook_size=8"]
    killed = []

    def lose_the_worker():  # once the child has a checkpoint: its worker and the child die (kill -9)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            found = _train_process(recipe)
            if found and list(tmp_path.glob("runs/*/checkpoints/step_*.pt")):
                for pid in found:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(found)
                return
            time.sleep(0.05)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killer = threading.Thread(target=lose_the_worker, daemon=True)
        killer.start()
        assert main(argv) == 2
        killer.join()
        err = capsys.readouterr().err
        assert killed and "1 children failed or were lost: 'K=8' (exit code -1)" in err, err
        (parent,), (child,) = sweep_runs(uri)
        assert child.info.status == "RUNNING"  # never ended; its checkpoints are in its run dir
        assert list((tmp_path / "runs" / child.info.run_id / "checkpoints").glob("step_*.pt"))
    finally:
        ray.shutdown()
    # the same command again (a new driver, as a new `vqkit sweep` process would be): the child
    # resumes from its checkpoint and finishes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv) == 0, capsys.readouterr()
        assert f"resuming run {child.info.run_id[:8]}" in capsys.readouterr().err
    finally:
        ray.shutdown()
    (parent2,), (child2,) = sweep_runs(uri)
    assert (parent2.info.run_id, child2.info.run_id) == (parent.info.run_id, child.info.run_id)
    assert child2.info.status == "FINISHED" and int(child2.data.tags["vqkit.resumed_from_step"]) > 0
