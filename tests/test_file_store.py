"""An MLflow file store (a plain folder path or a ``file:`` URI): MLflow 3.17 refuses to
open one (its server exits at start, its client raises "maintenance mode") unless
``MLFLOW_ALLOW_FILE_STORE=true``. vqkit says so in one `vqkit: error:` line naming the sqlite
store to use and MLflow's own ``mlflow migrate-filestore`` command, before starting
`mlflow server` (`vqkit ui`), before training (`vqkit train`, not "unreachable" with a
buffer that `vqkit sync` could never send) and without writing anything (read-only
commands)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vqkit.cli import main
from vqkit.testing.sweeps import write_recipe

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, workdir


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def file_store(workdir, monkeypatch):
    """``<workdir>/mlruns``: a file store holding one finished run of experiment "old",
    written by MLflow itself (opted in), then the opt-in removed."""
    from mlflow import MlflowClient

    folder = workdir / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=str(folder))
    run = client.create_run(client.create_experiment("old"), run_name="before")
    client.log_metric(run.info.run_id, "eval/psnr", 20.5, step=3)
    client.set_terminated(run.info.run_id)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return folder


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqkit: error: "), err
    return err[0]


def migrate_command(line: str) -> list[str]:
    (cmd,) = [part for i, part in enumerate(line.split("`")) if i % 2 and part.startswith("mlflow migrate-filestore")]
    return shlex.split(cmd)


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_ui_on_a_file_store_stops_before_the_server_and_says_how_to_migrate(file_store, capsys, monkeypatch, form):
    import vqkit.commands.ui as ui

    started = []
    monkeypatch.setattr(ui, "serve", lambda argv, env: started.append(argv) or 0)
    uri = str(file_store) if form == "path" else file_store.as_uri()
    before = tree(file_store)
    assert main(["ui", "--tracking-uri", uri]) == 2
    line = one_error(capsys)
    assert started == [] and tree(file_store) == before
    target = f"sqlite:///{file_store.parent / 'mlflow.db'}"
    assert line.startswith(f"vqkit: error: {uri} is an MLflow file store (a folder), which MLflow 3's UI does not serve "
                           "(`mlflow server` exits at start on one): copy its runs")
    assert f"`mlflow migrate-filestore --source {file_store} --target {target}`" in line, line
    assert f"`vqkit ui --tracking-uri {target}`" in line, line
    assert main(["ui", "--print", "--tracking-uri", uri]) == 2  # --print too: that command would fail
    assert one_error(capsys) == line

    # the command it names is MLflow's own and works: the run is then served from sqlite
    cmd = migrate_command(line)
    assert cmd[0] == "mlflow"
    subprocess.run([sys.executable, "-m", "mlflow", *cmd[1:], "--no-progress"], check=True, capture_output=True,
                   timeout=120)
    assert main(["ui", "--print", "--tracking-uri", target]) == 0
    out = capsys.readouterr()
    assert "--backend-store-uri " + target in out.out and "old: http://" in out.err
    assert main(["compare", "before", "--tracking-uri", target, "--format", "csv"]) == 0
    assert "20.5" in capsys.readouterr().out


def test_ui_serves_a_file_store_when_mlflow_is_told_to_allow_it(file_store, capsys, monkeypatch):
    """``MLFLOW_ALLOW_FILE_STORE=true`` is MLflow's own opt-in: its server then serves the
    folder, so vqkit does not stand in the way."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["ui", "--print", "--tracking-uri", str(file_store)]) == 0
    assert "old: http://" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compare", "before"],
    ["compare", "--experiment", "old"],
    ["eval", "before", "--no-log"],
    ["sample", "before", "-o", "x.png"],
])
def test_read_only_commands_on_a_file_store_say_so_and_write_nothing(file_store, workdir, capsys, monkeypatch,
                                                                   argv):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(file_store))  # (`sample` has no --tracking-uri)
    before = tree(workdir)
    assert main(argv) == 2
    line = one_error(capsys)
    assert line.startswith(f"vqkit: error: {file_store} is an MLflow file store (a folder), which MLflow 3 "
                           "no longer opens"), line
    assert f"`mlflow migrate-filestore --source {file_store} --target sqlite:///" in line, line
    assert tree(workdir) == before


def test_a_missing_folder_is_named_with_the_sqlite_store_to_use(workdir, capsys):
    assert main(["compare", "x", "--tracking-uri", "nothere"]) == 2
    line = one_error(capsys)
    assert line == ("vqkit: error: nothere is an MLflow file-store path (nothing is there), which MLflow 3 no "
                    f"longer opens: use a sqlite store, e.g. sqlite:///{workdir / 'mlflow.db'}")
    assert tree(workdir) == []


def test_a_sqlite_file_given_as_a_plain_path_gets_its_sqlite_uri(workdir, store, capsys):
    path = store[len("sqlite:///"):]
    assert main(["compare", "x", "--tracking-uri", path]) == 2
    line = one_error(capsys)
    assert line == (f"vqkit: error: {path} is a sqlite database given as a plain path, which MLflow reads as a "
                    f"file store (a folder): give sqlite:///{path}")


def test_train_on_a_file_store_stops_before_training(workdir, capsys):
    """Not "unreachable" with a buffer that `vqkit sync` could never send: one error, no run."""
    recipe = write_recipe(workdir, tracking={"uri": "mlruns", "experiment": "fs"})
    assert main(["train", str(recipe), "--quiet"]) == 2
    line = one_error(capsys)
    assert line == ("vqkit: error: mlruns is an MLflow file-store path (nothing is there), which MLflow 3 no "
                    f"longer opens: use a sqlite store, e.g. sqlite:///{workdir / 'mlflow.db'}")
    assert [p for p in tree(workdir) if p not in ("tiny.yaml", "runs")] == []
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir())
