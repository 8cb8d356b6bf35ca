"""`vqkit ui` stops the whole `mlflow server` (its uvicorn worker included) when it is
stopped itself: SIGTERM (`kill PID`, a service manager), SIGINT (Ctrl-C) and SIGHUP (the
terminal closed) are forwarded to the server's process group. A real server on a free port,
and a stand-in server (a process with a child) for each signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import psutil
import pytest

from tests.trainkit import free_port

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template



def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop_leftovers(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_sigterm_stops_the_mlflow_server_and_its_worker(store, tmp_path):
    pytest.importorskip("mlflow.server")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    err = tmp_path / "ui.err"
    with open(tmp_path / "ui.out", "w") as out, open(err, "w") as errf:
        ui = subprocess.Popen([sys.executable, "-m", "vqkit.cli", "ui", "--port", str(port)], env=env,
                              cwd=tmp_path, stdout=out, stderr=errf)
    server = []
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine starts it slowly
        while not answers(port):
            assert ui.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "mlflow server did not answer"
            time.sleep(1)
        server = psutil.Process(ui.pid).children(recursive=True)
        assert len(server) >= 2, server  # mlflow server and its uvicorn worker
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, alive
        assert not answers(port)
        assert "MLflow UI stopped (SIGTERM)" in err.read_text()
    finally:
        if ui.poll() is None:
            ui.kill()
        stop_leftovers(server)


STAND_IN = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_each_stop_signal_reaches_the_whole_server_group(sig, tmp_path):
    """`serve` (what `vqkit ui` runs the server with) in a process of its own, with a
    stand-in server that has a worker: the signal sent to that process stops both."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    driver = textwrap.dedent(f"""
        import sys
        from vqkit.commands.ui import serve
        sys.exit(serve([sys.executable, {str(script)!r}], None))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    group = []
    try:
        worker_pid = int(proc.stdout.readline())
        group = psutil.Process(proc.pid).children(recursive=True)
        assert worker_pid in [p.pid for p in group] and len(group) == 2
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        _, alive = psutil.wait_procs(group, timeout=30)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        stop_leftovers(group)


def test_ui_prints_the_pages_of_each_sweeps_children(store, tmp_path, capsys):
    """A sweep shows in MLflow's run list as one folded parent row: `vqkit ui` also prints,
    for each sweep, the run list filtered to its children (listed flat) and the compare-runs
    page of them (the forms docs/comparisons.md uses)."""
    import io

    from mlflow import MlflowClient

    from vqkit.cli import main
    from vqkit.tracking import Tracker

    parent = Tracker(store, "swept", "tiny sweep K", stderr=io.StringIO())
    pid = parent.start()
    parent.attach(tmp_path / "parent")
    parent.set_tags({"vqkit.sweep.role": "parent"})
    kids = []
    for name in ("K=8", "K=16"):
        t = Tracker(store, "swept", name, stderr=io.StringIO())
        kids.append(t.start())
        t.attach(tmp_path / name)
        t.set_tags({"mlflow.parentRunId": pid})
        assert t.finish()
    assert parent.finish()
    lone = Tracker(store, "swept", "lone run", stderr=io.StringIO())
    lone_id = lone.start()
    lone.attach(tmp_path / "lone")
    assert lone.finish()

    assert main(["ui", "--print", "--tracking-uri", store, "--port", "5171"]) == 0
    err = capsys.readouterr().err
    # the experiment's runs filtered to the children (listed flat, by name): the link's filter
    # run through MLflow's own search gives exactly them
    (line,) = [x for x in err.splitlines() if "/runs?searchFilter=" in x]
    assert "tiny sweep K" in line and "2 children" in line
    link = line.split()[-1]
    page, _, query = urllib.parse.urlsplit(link).fragment.partition("?")
    assert link.startswith("http://127.0.0.1:5171/#/") and page.endswith("/runs")
    query = dict(urllib.parse.parse_qsl(query, strict_parsing=True))
    assert query["workflowType"] == "machine_learning" and query["compareRunsMode"] == "CHART"
    client = MlflowClient(store)
    exp_id = client.get_run(pid).info.experiment_id
    assert page == f"/experiments/{exp_id}/runs"
    listed = client.search_runs([exp_id], query["searchFilter"], order_by=[f"{query['orderByKey']} ASC"])
    assert [r.info.run_id for r in listed] == [kids[1], kids[0]]  # "K=16" < "K=8"
    (line,) = [x for x in err.splitlines() if "compare-runs" in x]
    url = line.split()[-1]
    assert url.startswith("http://127.0.0.1:5171/#/compare-runs?runs=[") and url.endswith("workflowType=machine_learning")
    assert all(f'"{k}"' in url for k in kids) and pid not in url and lone_id not in url
