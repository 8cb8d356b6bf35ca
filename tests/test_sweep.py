"""`vqkit sweep`: grid expansion and run names, validation of every child before any runs,
child runs nested under one parent (read back from MLflow), a rerun that skips finished
children, an interrupted sweep that resumes, and a sweep against a real `mlflow server`.
Plain `vqkit train` runs: names from --set, MLflow's standard context, logged images."""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from vqkit.cli import main
from vqkit.errors import VqkitError
from vqkit.sweep import expand_grid, grid_labels, overrides_name, parse_grid
from vqkit.testing.sweeps import TINY_RECIPE

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port

TINY = TINY_RECIPE  # the tiny recipe vqkit.testing.sweeps gives plugin authors


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_template):
    """An empty working directory holding a migrated ./mlflow.db (the default store)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


def write(folder: Path, name: str = "tiny.yaml", **over) -> Path:
    data = {**TINY, **over}
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sweep_runs(uri: str, experiment: str = "sw"):
    """(parents, children) of the experiment, read back through MLflow's client."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vqkit.sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


# =========================================================================== grid and names
def test_grid_expansion_and_names():
    grid = parse_grid(["reset.name=none,jukebox", "quantizer.params.codebook_size=256,1024",
                       "encoder.params.channels=[8,16],[16,32]"])
    assert grid == {"reset.name": ["none", "jukebox"], "quantizer.params.codebook_size": [256, 1024],
                    "encoder.params.channels": [[8, 16], [16, 32]]}
    children = expand_grid(grid, ["train.steps=10"])
    assert len(children) == 8
    assert [c.name for c in children[:3]] == [
        "reset=none K=256 ch=[8,16]", "reset=none K=256 ch=[16,32]", "reset=none K=1024 ch=[8,16]"]
    first = children[0]
    assert first.values == {"reset.name": "none", "quantizer.params.codebook_size": 256,
                            "encoder.params.channels": [8, 16]}
    assert first.overrides[0] == "train.steps=10"  # the sweep's own overrides first
    assert 'reset.name="none"' in first.overrides and "encoder.params.channels=[8, 16]" in first.overrides
    assert 'tracking.run_name="reset=none K=256 ch=[8,16]"' in first.overrides
    # labels grow only where two keys would share one
    assert grid_labels(["encoder.params.channels", "decoder.params.channels", "train.lr"]) == {
        "encoder.params.channels": "encoder.ch", "decoder.params.channels": "decoder.ch", "train.lr": "lr"}
    assert grid_labels(["losses.0.weight", "losses.1.weight"]) == {
        "losses.0.weight": "losses[0].w", "losses.1.weight": "losses[1].w"}
    # a plain `vqkit train --set` run is named for its overrides (tracking keys left out)
    assert overrides_name("quickstart", ["train.steps=300", "train.lr=2.0e-3", "tracking.experiment=x"]) == \
        "quickstart steps=300 lr=0.002"
    assert overrides_name("quickstart", []) == "quickstart"
    with pytest.raises(VqkitError, match="expects KEY.PATH=V1,V2"):
        parse_grid(["reset.name"])


def test_a_key_through_a_list_index_is_named_with_its_list():
    """``losses.1.start_step=0`` names ``losses[1].start=0``, never the bare ``1.start=0``
    or ``start=0``: the index keeps its list, alone or beside other keys."""
    assert overrides_name("r", ["losses.1.start_step=0"]) == "r losses[1].start=0"
    assert overrides_name("r", ["losses.1.start_step=0", "losses.2.start_step=5", "train.steps=8"]) == \
        "r losses[1].start=0 losses[2].start=5 steps=8"
    assert overrides_name("r", ["losses.1.name=lpips", "losses.0.params.net=vgg"]) == \
        "r losses[1]=lpips losses[0].net=vgg"
    assert overrides_name("r", ["encoder.params.channels.0=8"]) == "r ch[0]=8"
    children = expand_grid(parse_grid(["losses.1.weight=0.1,1"]))
    assert [c.name for c in children] == ["losses[1].w=0.1", "losses[1].w=1"]


def test_every_child_is_validated_before_any_runs(workdir, capsys):
    recipe = write(workdir, sweep={"grid": {"train.lr": [0.001, -1.0]}})
    code = main(["sweep", str(recipe), "--grid", "reset.name=none,jukebx",
                 "--grid", "quantizer.params.codebok_size=8"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vqkit: error:")]
    assert code == 2 and "Traceback" not in err
    # all problems at once, each located and saying which children it concerns
    assert any(line.startswith("vqkit: error: --grid reset.name: reset.name: ") and "'jukebx'" in line
               and "did you mean 'jukebox'" in line and "[child 'lr=0.001 reset=jukebx codebok_size=8', " in line
               for line in lines), err
    assert any("--grid quantizer.params.codebok_size: " in line and "did you mean 'codebook_size'" in line
               and "[every child]" in line for line in lines), err
    assert any(line.startswith(f"vqkit: error: {recipe}:") and "train.lr" in line and "lr=-1" in line
               for line in lines), err  # the recipe's own sweep.grid, at its line
    assert not (workdir / "runs").exists()  # nothing started
    # a valid grid: --dry-run lists the children and trains nothing
    assert main(["sweep", str(recipe), "--grid", "train.lr=0.001,0.002", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1/2  lr=0.001" in out and "2/2  lr=0.002" in out
    assert main(["sweep", str(write(workdir, "plain.yaml"))]) == 2
    assert "nothing to sweep" in capsys.readouterr().err


# =========================================================================== running sweeps
def test_sweep_nests_children_and_a_rerun_skips_finished_ones(workdir, capsys):
    recipe = write(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = ["sweep", str(recipe), "--grid", "quantizer.params.codebook_size=8,16", "--jobs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (parent,), children = sweep_runs(uri)
    assert sorted(r.info.run_name for r in children) == ["K=16", "K=8"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children) and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.grid.quantizer.params.codebook_size"] == "[8, 16]"
    assert parent.info.run_name == "tiny sweep K"
    # summary: the best child per metric, a table artifact, the table printed
    best = parent.data.tags["vqkit.sweep.best.eval/psnr"]
    best_psnr = max(r.data.metrics["eval/psnr"] for r in children)
    assert parent.data.metrics["best/eval/psnr"] == pytest.approx(best_psnr)
    assert best.startswith(next(r.info.run_name for r in children if r.data.metrics["eval/psnr"] == best_psnr))
    c = client(uri)
    assert {"summary.md", "summary.csv", "recipe.yaml"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "K=8" in out and "quantizer.params.codebook_size" in out
    # the children listed flat in MLflow's UI (unfiltered, the run list folds them under the
    # parent): the link's search filter and sort key, run through MLflow's own search, give
    # exactly the children by name
    link = next(line for line in out.splitlines() if "children in MLflow's UI" in line).split()[-1]
    page, _, query = urllib.parse.urlsplit(link).fragment.partition("?")
    assert link.startswith("http://127.0.0.1:5000/#/") and page == f"/experiments/{parent.info.experiment_id}/runs"
    query = dict(urllib.parse.parse_qsl(query, strict_parsing=True))
    assert query["workflowType"] == "machine_learning" and query["compareRunsMode"] == "CHART"
    listed = client(uri).search_runs([parent.info.experiment_id], query["searchFilter"],
                                     order_by=[f"{query['orderByKey']} {'ASC' if query['orderByAsc'] == 'true' else 'DESC'}"])
    assert [r.info.run_name for r in listed] == ["K=16", "K=8"]
    # and side by side on the compare page
    url = next(line for line in out.splitlines() if "compare-runs" in line).split()[-1]
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=[")
    assert all(f'"{r.info.run_id}"' in url for r in children)
    assert f'experiments=["{parent.info.experiment_id}"]' in url and url.endswith("workflowType=machine_learning")
    # each child got half the threads: its own log says which command it ran
    logs = sorted((workdir / "runs" / parent.info.run_id / "children").glob("*.log"))
    assert len(logs) == 2 and "MLflow run" in logs[0].read_text()

    # the same command again: nothing is trained, nothing is added to MLflow
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 of 2 already finished, skipped" in err
    parents, again = sweep_runs(uri)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in children)
    # compare takes the parent (by id prefix) for its children
    assert main(["compare", parent.info.run_id[:8], "--sort", "eval/psnr", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("run,id,status,quantizer.params.codebook_size")
    assert rows[1].startswith(best.split(" (")[0] + ",")


def test_a_rerun_finds_its_sweep_after_a_release_adds_a_key_and_from_an_older_id(workdir, capsys, monkeypatch):
    """A sweep is identified by the settings that differ from their defaults: after a release
    (or a plugin update) adds a key with a default to a component, the same command is the
    same sweep; so is the recipe with defaults spelled out. A parent tagged with the id
    earlier versions computed (from every default) is found, not trained again, and
    retagged."""
    from vqkit.components.vq import VectorQuantizer
    from vqkit.sweep import plan_sweep

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    recipe = write(workdir)
    grid = ["--grid", "quantizer.params.codebook_size=8,16"]
    assert main(["sweep", str(recipe), *grid]) == 0
    (parent,), children = sweep_runs(uri)
    before = plan_sweep(str(recipe), ["quantizer.params.codebook_size=8,16"])

    class Later(VectorQuantizer.Params):
        future_knob: float = 0.0  # what the next release adds, off by default

    monkeypatch.setattr(VectorQuantizer, "Params", Later)
    after = plan_sweep(str(recipe), ["quantizer.params.codebook_size=8,16"])
    assert after.recipes[0].to_dict()["quantizer"]["params"]["future_knob"] == 0.0
    assert after.sweep_id == before.sweep_id and after.legacy_sweep_id != before.legacy_sweep_id
    capsys.readouterr()
    assert main(["sweep", str(recipe), *grid]) == 0
    assert "2 of 2 already finished, skipped" in capsys.readouterr().err
    assert [p.info.run_id for p in sweep_runs(uri)[0]] == [parent.info.run_id]
    spelled = write(workdir, "spelled.yaml", discriminator=None,
                    train={**TINY["train"], "grad_clip": 1.0, "amp": False},
                    quantizer={"name": "vq", "params": {"codebook_size": 16, "beta": 0.25, "future_knob": 0.0}})
    assert main(["sweep", str(spelled), *grid]) == 0
    assert "2 of 2 already finished, skipped" in capsys.readouterr().err

    # a parent made by an earlier version carries the old id: found and retagged
    client(uri).set_tag(parent.info.run_id, "vqkit.sweep.id", after.legacy_sweep_id)
    assert main(["sweep", str(recipe), *grid]) == 0
    assert "2 of 2 already finished, skipped" in capsys.readouterr().err
    (again,), kids = sweep_runs(uri)
    assert again.info.run_id == parent.info.run_id and len(kids) == len(children) == 2
    assert again.data.tags["vqkit.sweep.id"] == after.sweep_id
    # a setting that differs from its default is another sweep
    assert main(["sweep", str(recipe), *grid, "--set", "train.grad_clip=0.5"]) == 0
    assert len(sweep_runs(uri)[0]) == 2


def test_interrupted_sweep_resumes_from_the_checkpoint(workdir, capsys):
    recipe = write(workdir, train={**TINY["train"], "steps": 400, "log_every": 20, "eval_every": 400,
                                   "image_every": 400, "checkpoint_every": 10})
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = ["sweep", str(recipe), "--grid", "quantizer.params.codebook_size=8"]
    with subprocess.Popen([sys.executable, "-m", "vqkit.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        try:
            deadline = time.monotonic() + 600  # generous: CI machines can be busy
            while not list(workdir.glob("runs/*/checkpoints/step_*.pt")):  # a checkpoint is written
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` does
            output = proc.communicate(timeout=300)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, output
    (parent,), (child,) = sweep_runs(uri)
    assert child.info.status == "KILLED" and parent.info.status == "KILLED"
    assert "vqkit.last_checkpoint" in child.data.tags

    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming run {child.info.run_id[:8]}" in err
    (parent2,), (child2,) = sweep_runs(uri)
    assert (parent2.info.run_id, child2.info.run_id) == (parent.info.run_id, child.info.run_id)
    assert child2.info.status == "FINISHED" and parent2.info.status == "FINISHED"
    assert 0 < int(child2.data.tags["vqkit.resumed_from_step"]) < 400
    steps = [m.step for m in client(uri).get_metric_history(child.info.run_id, "loss/total")]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_sweep_against_a_real_mlflow_server(workdir, mlflow_template, capsys, monkeypatch):
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        pytest.fail("the full mlflow package (server) is a test dependency: pip install 'mlflow>=3,<4'")
    server_dir = workdir / "server"
    server_dir.mkdir()
    shutil.copyfile(mlflow_template, server_dir / "store.db")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{server_dir / 'store.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=server_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        recipe = write(workdir, tracking={"experiment": "sw", "description": "a *tiny* sweep"})
        assert main(["sweep", str(recipe), "--grid", "reset.name=none,random", "--jobs", "2"]) == 0
        (parent,), children = sweep_runs(url)
        assert sorted(r.info.run_name for r in children) == ["reset=none", "reset=random"]
        assert all(r.info.status == "FINISHED" for r in children)
        assert parent.data.tags["mlflow.note.content"].startswith("a *tiny* sweep")
        c = client(url)
        exp = c.get_experiment_by_name("sw")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        child = children[0]
        assert child.data.tags["mlflow.note.content"] == "a *tiny* sweep"
        images = [a.path for a in c.list_artifacts(child.info.run_id, "images")]
        assert any(p.startswith("images/reconstructions+step+4+") for p in images)
        assert [a.path for a in c.list_artifacts(child.info.run_id, "grids")] == ["grids/recon_000004.png"]
        run = c.get_run(child.info.run_id)
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"} and inputs["train"].name == "fashion-mnist"
        assert len(inputs["train"].digest) == 16 and inputs["train"].digest != inputs["test"].digest
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, by its PID
        server.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


# =========================================================================== plain train runs
def test_train_with_set_is_named_for_it_and_has_mlflow_context(workdir, capsys):
    recipe = write(workdir, tracking={"experiment": "sw", "description": "first try", "system_metrics": False})
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert main(["train", str(recipe), "--set", "train.steps=2", "--set", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert f"vqkit ui --tracking-uri {uri}" in out  # how to open the store
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("sw").experiment_id])
    assert run.info.run_name == "tiny steps=2 lr=1e-3"  # as typed
    tags = run.data.tags
    assert tags["mlflow.source.name"] == str(recipe) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.project.entryPoint"] == "vqkit train" and tags["mlflow.user"]
    assert tags["mlflow.note.content"] == "first try"
    assert "mlflow.source.git.commit" not in tags  # tmp_path is no git checkout
    assert c.get_experiment_by_name("sw").tags["mlflow.experimentKind"] == "custom_model_development"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"fashion-mnist"}
    # a recipe inside a git checkout records its commit
    repo = workdir / "repo"
    repo.mkdir()
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is needed for this test")
    subprocess.run([git, "init", "-q", str(repo)], check=True)
    inside = write(repo, tracking={"experiment": "sw", "run_name": "named"})
    subprocess.run([git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([git, "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "r"],
                   check=True)
    head = subprocess.run([git, "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert main(["train", str(inside), "--set", "train.steps=2"]) == 0
    (named,) = c.search_runs([c.get_experiment_by_name("sw").experiment_id], "attributes.run_name = 'named'")
    assert named.data.tags["mlflow.source.git.commit"] == head  # tracking.run_name wins over --set naming


def test_system_metrics_are_logged_while_the_monitor_runs(workdir):
    from vqkit.tracking import SystemMetrics, Tracker

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    t = Tracker(uri, "sysm", "r", stderr=io.StringIO())
    run_id = t.start()
    monitor = SystemMetrics(uri, run_id, interval_s=0.2)
    time.sleep(1.5)
    monitor.finish()
    assert t.finish()
    metrics = client(uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
