"""MLflow tracking: URI resolution, batching limits, the offline buffer, sync and compare."""
from __future__ import annotations

import io
import json

import pytest

from vqkit.cli import main
from vqkit.tracking import BUFFER, RUN_INFO, Tracker, resolve_tracking_uri

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path.resolve() / 'rel/x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None) == "http://tracking.example:5000"
    assert resolve_tracking_uri("file:///tmp/mlruns") == "file:///tmp/mlruns"


def test_params_tags_metrics_artifacts_in_batches(tmp_path, store):
    t = Tracker(store, "exp", "run-a", stderr=io.StringIO())
    run_id = t.start()
    t.attach(tmp_path / "run")
    params = {f"p.{i:03d}": i for i in range(250)}
    params["long"] = "x" * 7000
    params["listy"] = [1, 2, 3]
    t.log_params(params)
    t.set_tags({"vqkit.version": "0.0-test"})
    t.log_metrics({f"m/{i}": float(i) for i in range(1500)}, step=1)  # > 1000 per batch
    t.log_metrics({"loss/total": 0.5}, step=2)
    art = tmp_path / "recipe.yaml"
    art.write_text("vqkit: 1\n")
    t.log_artifact(art)
    assert t.finish()
    client = _client(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert len(run.data.params) == 252
    assert run.data.params["p.249"] == "249" and run.data.params["listy"] == "[1, 2, 3]"
    assert 5000 < len(run.data.params["long"]) <= 6000
    assert run.data.tags["vqkit.version"] == "0.0-test"
    assert len(run.data.metrics) == 1501 and run.data.metrics["m/1499"] == 1499.0
    assert [a.path for a in client.list_artifacts(run_id)] == ["recipe.yaml"]
    # artifacts live next to the database, not in the working directory
    assert (tmp_path / "mlruns").is_dir()
    assert not (tmp_path / "run" / BUFFER).exists()


def test_unreachable_store_warns_once_buffers_and_recovers(tmp_path, store, closed_port):
    err = io.StringIO()
    t = Tracker(f"http://127.0.0.1:{closed_port}", "exp", "offline", stderr=err)
    t.retry_s = 3600.0  # no automatic retry during the test
    assert t.start() is None and not t.online
    run_dir = t.attach(tmp_path / "run")
    t.log_params({"a": 1})
    for step in range(1, 6):
        t.log_metrics({"loss/total": 1.0 / step}, step=step)
    assert err.getvalue().count("unreachable") == 1
    ops = [json.loads(line) for line in (run_dir / BUFFER).read_text().splitlines()]
    assert [op["op"] for op in ops] == ["start", "params"] + ["metrics"] * 5
    # the store comes back (here: another URI); finishing sends everything in order
    t.uri, t._client = store, None
    assert t.finish()
    assert not (run_dir / BUFFER).exists()
    client = _client(store)
    run = client.get_run(t.run_id)
    history = client.get_metric_history(t.run_id, "loss/total")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert run.data.params == {"a": "1"} and run.info.status == "FINISHED"
    assert json.loads((run_dir / RUN_INFO).read_text())["run_id"] == t.run_id


def test_buffer_left_by_a_dead_process_is_sent_by_sync(tmp_path, store, capsys, closed_port):
    t = Tracker(f"http://127.0.0.1:{closed_port}", "exp", "crashed", stderr=io.StringIO())
    t.start()
    run_dir = t.attach(tmp_path / "run")
    t.log_metrics({"loss/total": 2.0}, step=10)
    assert not t.finish("FAILED")  # still unreachable: kept on disk
    # the server is back at another address: point run.json at it and sync
    info = json.loads((run_dir / RUN_INFO).read_text())
    info["tracking_uri"] = store
    (run_dir / RUN_INFO).write_text(json.dumps(info))
    assert main(["sync", str(run_dir)]) == 0
    assert "sent" in capsys.readouterr().out
    run = _client(store).search_runs([_client(store).get_experiment_by_name("exp").experiment_id])[0]
    assert run.data.metrics == {"loss/total": 2.0} and run.info.status == "FAILED"
    assert main(["sync", str(run_dir)]) == 0  # nothing left: still fine


def test_sync_against_a_server_still_down_does_not_talk_of_training(tmp_path, capsys, closed_port):
    t = Tracker(f"http://127.0.0.1:{closed_port}", "exp", "crashed", stderr=io.StringIO())
    t.start()
    run_dir = t.attach(tmp_path / "run")
    t.log_metrics({"loss/total": 2.0}, step=10)
    assert not t.finish()
    capsys.readouterr()
    assert main(["sync", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "training" not in err
    assert (run_dir / BUFFER).is_file()


def test_resumed_run_keeps_params_and_tags_changes(tmp_path, store):
    t = Tracker(store, "exp", "r", stderr=io.StringIO())
    run_id = t.start()
    t.log_params({"train.steps": 10, "seed": 0})
    t.finish()
    t2 = Tracker(store, "exp", "r", stderr=io.StringIO())
    assert t2.start(resume_run_id=run_id) == run_id
    t2.log_params({"train.steps": 20, "seed": 0, "new": 1})
    t2.finish()
    run = _client(store).get_run(run_id)
    assert run.data.params == {"train.steps": "10", "seed": "0", "new": "1"}
    assert run.data.tags["vqkit.changed.train.steps"] == "20"


def test_compare_shows_differing_params_and_final_metrics(tmp_path, store, capsys):
    ids = []
    for lr, psnr in ((0.001, 20.0), (0.002, 22.5)):
        t = Tracker(store, "cmp", f"lr{lr}", stderr=io.StringIO())
        ids.append(t.start())
        t.log_params({"train.lr": lr, "seed": 0})
        t.log_metrics({"eval/psnr": psnr - 1}, step=1)
        t.log_metrics({"eval/psnr": psnr}, step=2)
        t.finish()
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "0.001" in out and "0.002" in out
    assert "seed" not in out  # identical params are hidden
    assert "22.5" in out and "eval/psnr" in out
    assert main(["compare", *ids, "--tracking-uri", store, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["metrics"]["eval/psnr"] for r in rows] == [20.0, 22.5]
    assert main(["compare", "--experiment", "nope", "--tracking-uri", store]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_a_run_with_system_metrics_has_them_in_the_store(tmp_path, monkeypatch):
    """`tracking.system_metrics: true` on a real (tiny) training run: its system/* metrics
    (psutil: CPU, memory) are in the sqlite store afterwards."""
    from mlflow import MlflowClient

    from vqkit.testing.sweeps import write_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    recipe = write_recipe(tmp_path, tracking={"experiment": "sysm", "system_metrics": True})
    assert main(["train", str(recipe), "--quiet", "--set", "train.steps=6"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sysm").experiment_id])
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


def test_a_run_the_store_refuses_to_create_is_a_user_error_not_an_offline_store(tmp_path, store):
    """MLflow refusing the run itself (an invalid experiment name) is not "unreachable":
    nothing could ever be sent after it, so it stops at once instead of buffering forever."""
    from vqkit.errors import VqkitError

    err = io.StringIO()
    t = Tracker(store, "", "refused", stderr=err)
    with pytest.raises(VqkitError, match="refused to create the run: .*experiment name"):
        t.start()
    assert "unreachable" not in err.getvalue()
