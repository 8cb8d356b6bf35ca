"""Tracking under faults: concurrent first runs on a new sqlite store, a store that
cannot be opened, a server that accepts connections and never answers, an earlier leg's
buffer replayed into a resumed run, and a process killed in the middle of sending its
buffer. MLflow contents are read back from the sqlite store."""
from __future__ import annotations

import io
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from vqkit.cli import main
from vqkit.testing.sweeps import TINY_RECIPE
from vqkit.tracking import BUFFER, RUN_INFO, SENT, Tracker

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port

TINY = {
    **TINY_RECIPE,
    "train": {"steps": 4, "batch_size": 16, "log_every": 1, "eval_every": 4, "image_every": 100,
              "checkpoint_every": 2, "device": "cpu"},
    "eval": {"num_samples": 16, "batch_size": 16, "metrics": ["psnr"]},
    "tracking": {"experiment": "faults"},
}


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _env():
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# =========================================================================== store creation
_LOGGER = r"""
import sys
from vqkit.tracking import Tracker
t = Tracker(sys.argv[1], "faults", "light")
t.start()
t.attach(sys.argv[2])
for step in range(1, 5):
    t.log_metrics({"loss/total": 1.0 / step}, step=step)
sys.exit(0 if t.finish() else 3)
"""


@pytest.mark.parametrize("trial", ["train", "tracker-1", "tracker-2", "tracker-3"])
def test_concurrent_first_runs_on_a_new_store_both_complete(tmp_path, trial):
    """Two processes started together on a sqlite store that does not exist yet: two
    `vqkit train`, then (cheaper, same store creation) two bare trackers, several times."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if trial == "train":
        recipe = tmp_path / "tiny.yaml"
        recipe.write_text(yaml.safe_dump({**TINY, "tracking": {"experiment": "faults", "uri": uri}}))
        cmds = [[sys.executable, "-m", "vqkit.cli", "train", str(recipe), "--quiet"]] * 2
    else:
        cmds = [[sys.executable, "-c", _LOGGER, uri, str(tmp_path / f"run{i}")] for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in cmds]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "unreachable" not in err and "warning" not in err, err
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(steps) == [1, 2, 3, 4], steps
        if trial == "train":
            assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/psnr")] == [4]


@pytest.mark.parametrize("kind", ["text", "half_migrated"])
def test_a_store_that_cannot_be_opened_is_named_not_unreachable(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    if kind == "text":
        db.write_text("this is not a database\n" * 10)
    else:  # tables of an interrupted migration
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("CREATE TABLE _alembic_tmp_tags (key TEXT)")
        con.commit()
        con.close()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vqkit: error: the MLflow tracking store {db} exists but cannot be opened: ")
    assert "unreachable" not in err and "Traceback" not in err
    assert main(["sync", str(tmp_path)]) in (0, 2)  # nothing buffered: says so, no traceback
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# =========================================================================== hung server
@pytest.fixture
def hung_server():
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_server_costs_a_few_seconds_per_retry_and_operations_are_buffered(tmp_path, hung_server, monkeypatch):
    import vqkit.tracking as tracking

    assert tracking.REQUEST_TIMEOUT_S <= 5
    monkeypatch.setattr(tracking, "REQUEST_TIMEOUT_S", 2.0)  # the same code path, a shorter test
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setattr(tracking, "_USER_TIMEOUT", "")
    err = io.StringIO()
    t = Tracker(f"http://127.0.0.1:{hung_server}", "exp", "hung", stderr=err)
    t.retry_s = 1.0
    t0 = time.monotonic()
    assert t.start() is None
    first = time.monotonic() - t0
    t.attach(tmp_path / "run")
    durations = []
    for step in range(1, 13):  # 12 steps of 0.25 s: at least two retries fall in here
        s0 = time.monotonic()
        t.log_metrics({"loss/total": 1.0 / step}, step=step)
        durations.append(time.monotonic() - s0)
        time.sleep(0.25)
    assert first < 2.0 + 1.5, first
    assert max(durations) < 2.0 + 1.5, durations
    assert sum(d > 1.0 for d in durations) >= 2  # it did retry, each time bounded
    assert err.getvalue().count("unreachable") == 1 and "training continues" in err.getvalue()
    ops = [json.loads(line) for line in (tmp_path / "run" / BUFFER).read_text().splitlines()]
    assert [op["step"] for op in ops if op["op"] == "metrics"] == list(range(1, 13))


# =========================================================================== buffer replay
def _buffer_of_an_earlier_leg(run_dir: Path, uri: str, run_id: str, ops: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / RUN_INFO).write_text(json.dumps({"run_id": run_id, "local_id": "abc", "tracking_uri": uri,
                                                "experiment": "exp", "run_name": "r"}))
    with open(run_dir / BUFFER, "w") as f:
        for i, op in enumerate(ops, start=1):
            f.write(json.dumps({**op, "seq": i}) + "\n")


def test_an_earlier_legs_end_is_not_replayed_and_its_later_steps_are_superseded(tmp_path, store):
    first = Tracker(store, "exp", "r", stderr=io.StringIO())
    run_id = first.start()
    first.attach(tmp_path / "first")
    first.log_metrics({"loss/total": 1.0}, step=1)
    first.log_metrics({"loss/total": 2.0}, step=2)  # sent before the kill
    first.flush()
    # the earlier leg was then offline: steps 3..6 and its `end KILLED` stayed in its buffer
    ops = [{"op": "start"}] + [{"op": "metrics", "step": s, "ts": 1000 + s, "metrics": {"loss/total": 10.0 + s}}
                               for s in range(3, 7)] + [{"op": "end", "status": "KILLED"}]
    run_dir = tmp_path / "run"
    _buffer_of_an_earlier_leg(run_dir, store, run_id, ops)
    resumed = Tracker(store, "exp", "r", stderr=io.StringIO())
    resumed.start(resume_run_id=run_id, after_step=4)  # the checkpoint was at step 4
    resumed.attach(run_dir)
    client = _client(store)
    assert client.get_run(run_id).info.status == "RUNNING"  # not KILLED while it trains
    for step in range(5, 8):  # the resumed leg logs 5..7
        resumed.log_metrics({"loss/total": 100.0 + step}, step=step)
    resumed.log_metrics({"loss/total": 999.0}, step=2)  # a step already in the store: not again
    assert resumed.finish()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss/total"))
    assert history == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (run_dir / BUFFER).exists() and not (run_dir / SENT).exists()


_CRASHING_SYNC = r"""
import json, os, signal, sys
from mlflow import MlflowClient
from vqkit.tracking import Tracker
log, kill_after = sys.argv[2], int(sys.argv[3])
original = MlflowClient.log_batch
calls = []
def log_batch(self, run_id, metrics=(), params=(), tags=(), **kw):
    original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)
    with open(log, "a") as f:
        for m in metrics:
            f.write(json.dumps([m.key, m.step]) + "\n")
    if metrics:
        calls.append(1)
        if len(calls) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # after the send, before its sent mark
MlflowClient.log_batch = log_batch
Tracker.from_run_dir(sys.argv[1]).flush()
"""


def test_a_crash_during_a_drain_resends_nothing(tmp_path, store, closed_port):
    import os

    run_dir = tmp_path / "run"
    offline = Tracker(f"http://127.0.0.1:{closed_port}", "exp", "r", stderr=io.StringIO())
    offline.start()
    offline.attach(run_dir)
    offline.log_params({"a": 1})
    for step in range(1, 9):
        offline.log_metrics({"loss/total": float(step)}, step=step)
        offline.set_tags({f"t{step}": step})  # one metrics op per send
    offline.finish()
    info = json.loads((run_dir / RUN_INFO).read_text())
    (run_dir / RUN_INFO).write_text(json.dumps({**info, "tracking_uri": store}))  # the server is back
    first_log, second_log = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = subprocess.run([sys.executable, "-c", _CRASHING_SYNC, str(run_dir), str(first_log), "4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    sent_first = [tuple(json.loads(line)) for line in first_log.read_text().splitlines()]
    assert len(sent_first) == 4  # killed right after the 4th metrics op was sent
    proc = subprocess.run([sys.executable, "-c", _CRASHING_SYNC, str(run_dir), str(second_log), "1000"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sent_second = [tuple(json.loads(line)) for line in second_log.read_text().splitlines()]
    assert not set(sent_first) & set(sent_second), (sent_first, sent_second)  # nothing sent twice
    assert sorted(sent_first + sent_second) == [("loss/total", s) for s in range(1, 9)]
    client = _client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"} and run.data.tags["t8"] == "8"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total")) == list(range(1, 9))
    assert not (run_dir / BUFFER).exists()
