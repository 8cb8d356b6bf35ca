"""vqkit-ray: the launcher contract (a local instance the launcher starts and shuts down), and
sweeps against an existing Ray cluster, as on a real one: a head node and a worker node, each
started by `ray start ... --block` with 1 CPU (2 in all), joined through their address; 4
tiny children read back from the tracking store; a lost worker leaves its child resumable.
The cluster is one per module, stopped by signalling the two `ray start` processes (never
`ray stop`, which would stop every Ray instance on the machine)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from vqkit_ray import RayLauncher

from vqkit.cli import main
from vqkit.plugins import get_registry
from vqkit.testing import contract_checks
from vqkit.testing.sweeps import sqlite_store, sweep_runs, write_recipe

CHECKS = contract_checks("launchers")
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(RayLauncher)  # starts a local instance of 2 CPUs and shuts it down (close)
    assert not ray.is_initialized()


def test_registered_through_its_entry_point():
    entry = get_registry().get("launchers", "ray")
    assert entry.cls is RayLauncher and entry.distribution == "vqkit-ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start ... --block`, once it says the node runs (it stops its node on SIGTERM)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, "start", *argv, "--disable-usage-stats", "--block"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"`ray start {' '.join(argv)}` did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # --block: stops the processes of its node, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on this machine (head + worker, 1 CPU each); yields its address.
    Token authentication (on by default for `ray start --head`) is off: a driver reads its
    token once per process, when Ray is first used, and this process already used Ray."""
    temp = Path(tempfile.mkdtemp(prefix="vqr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    procs = [_start(["--head", "--num-cpus", "1", "--port", str(port), "--include-dashboard=false",
                     "--temp-dir", str(temp)], env, temp / "head.log")]
    try:
        procs.append(_start(["--address", f"127.0.0.1:{port}", "--num-cpus", "1"], env, temp / "worker.log"))
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count(str(temp))]
    assert not left, f"processes of the test cluster left: {[_cmdline(p) for p in left]}"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def workdir(tmp_path, monkeypatch, cluster):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path, cluster


def test_four_children_as_tasks_of_an_existing_two_node_cluster(workdir, capsys):
    tmp_path, address = workdir
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path)
    code = main(["sweep", str(recipe), "--launcher", "ray", "--jobs", "4", "--set",
                 f"sweep.launcher.params.address={address}",
                 "--grid", "quantizer.params.codebook_size=8,16", "--grid", "reset.name=none,random"])
    assert code == 0, capsys.readouterr().err
    assert not ray.is_initialized()  # the launcher joined the cluster and left it after the sweep
    (parent,), children = sweep_runs(uri)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.info.run_name for r in children) == [
        "K=16 reset=none", "K=16 reset=random", "K=8 reset=none", "K=8 reset=random"]
    assert parent.info.status == "FINISHED" and parent.data.tags["vqkit.sweep.launcher"] == "ray"
    # 4 children were in flight (--jobs 4) but each declared 1 CPU: the two nodes ran at most 2 at once
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert 1 <= overlap <= 2, spans
    # each child's output came back from its task into the sweep's log folder
    logs = sorted((tmp_path / "runs" / parent.info.run_id / "children").glob("*.log"))
    assert len(logs) == 4 and all("MLflow run" in p.read_text() for p in logs)
    # the cluster the children ran on: two alive nodes of 1 CPU each
    ray.init(address=address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert sorted(n["Resources"].get("CPU") for n in nodes) == [1.0, 1.0]
    finally:
        ray.shutdown()


def _train_process(recipe) -> tuple[int, int] | None:
    """(pid, parent pid: its Ray worker) of this test's child (`vqkit train RECIPE`), if one runs;
    never another test's process."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"vqkit.cli" in cmd and b"train" in cmd and str(recipe).encode() in cmd:
            return int(proc.name), int(stat[1])
    return None


def test_a_lost_worker_leaves_the_child_resumable_and_the_sweep_rerunnable(workdir, capsys):
    tmp_path, address = workdir
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path, train={"steps": 100, "batch_size": 16, "log_every": 50, "eval_every": 100,
                                           "image_every": 100, "checkpoint_every": 2, "keep_checkpoints": 1,
                                           "device": "cpu"})
    argv = ["sweep", str(recipe), "--launcher", "ray", "--grid", "quantizer.params.codebook_size=8",
            "--set", f"sweep.launcher.params.address={address}"]
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

    killer = threading.Thread(target=lose_the_worker, daemon=True)
    killer.start()
    assert main(argv) == 2
    killer.join()
    err = capsys.readouterr().err
    assert killed and "1 children failed or were lost: 'K=8' (exit code -1)" in err, err
    (parent,), (child,) = sweep_runs(uri)
    assert child.info.status == "RUNNING"  # never ended; its checkpoints are in its run dir
    assert list((tmp_path / "runs" / child.info.run_id / "checkpoints").glob("step_*.pt"))
    # the same command again (a new driver, as a new `vqkit sweep` process would be): the child
    # resumes from its checkpoint on the cluster and finishes
    assert main(argv) == 0, capsys.readouterr()
    assert f"resuming run {child.info.run_id[:8]}" in capsys.readouterr().err
    (parent2,), (child2,) = sweep_runs(uri)
    assert (parent2.info.run_id, child2.info.run_id) == (parent.info.run_id, child.info.run_id)
    assert child2.info.status == "FINISHED" and int(child2.data.tags["vqkit.resumed_from_step"]) > 0
