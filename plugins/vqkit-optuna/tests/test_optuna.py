"""vqkit-optuna: the search contract, and an 8-trial TPE search with median pruning on a short
quickstart variant that is interrupted (SIGTERM), then finished by running the same command
again: pruned trials are marked in MLflow, the study continues where it stopped."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from vqkit_optuna import OptunaSearch

from vqkit.cli import main
from vqkit.plugins import get_registry
from vqkit.testing import contract_checks
from vqkit.testing.sweeps import sqlite_store, sweep_runs

QUICKSTART = Path(__file__).resolve().parents[3] / "recipes" / "quickstart.yaml"
CHECKS = contract_checks("searches")
# the quickstart, short: 30 steps on 512 images, evaluated every 10 steps on 64
SHORT = ["data.params.limit=512", "train.steps=30", "train.batch_size=32", "train.warmup_steps=0",
         "train.log_every=10", "train.eval_every=10", "train.image_every=30", "train.checkpoint_every=10",
         "train.device=cpu", "eval.num_samples=64", "eval.batch_size=64", "tracking.experiment=sw"]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(OptunaSearch)


def test_registered_through_its_entry_point():
    entry = get_registry().get("searches", "optuna")
    assert entry.cls is OptunaSearch and entry.distribution == "vqkit-optuna"
    assert entry.cls.capabilities() == {"adaptive": True, "prunes": True}


def _argv() -> list[str]:
    argv = ["sweep", str(QUICKSTART), "--search", "optuna", "--budget", "8", "--objective", "eval/psnr:max",
            "--space", "train.lr={low: 1.0e-4, high: 0.1, log: true}",
            "--space", "quantizer.params.codebook_size=[64, 256]",
            "--set", "sweep.search.params.startup_trials=2"]
    for text in SHORT:
        argv += ["--set", text]
    return argv


def _ended(uri: str) -> int:
    try:
        _, children = sweep_runs(uri)
    except Exception:  # the store is being written
        return 0
    return sum(r.info.status in ("FINISHED", "KILLED") for r in children)


def test_eight_trials_with_pruning_resume_after_an_interruption(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path)
    # first run: interrupted (SIGTERM, what a scheduler or `kill` sends) once 3 trials have ended
    proc = subprocess.Popen([sys.executable, "-m", "vqkit.cli", *_argv()], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    while _ended(uri) < 3:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the first trials took too long"
        time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    (parent,), before = sweep_runs(uri)
    assert parent.info.status == "KILLED" and 3 <= len(before) < 8
    journal = tmp_path / "runs" / parent.info.run_id / "optuna.journal"
    study = optuna.load_study(study_name="vqkit-sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len(study.trials) < 8
    # the study so far is an artifact of the interrupted parent run
    interrupted = _study_artifact(uri, parent.info.run_id, tmp_path / "download1")
    assert [t.number for t in interrupted.trials] == [t.number for t in study.trials]

    # the same command again: the study continues to 8 trials, the interrupted child resumes
    assert main(_argv()) == 0, capsys.readouterr().err
    (again,), children = sweep_runs(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    study = optuna.load_study(study_name="vqkit-sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    states = {t.number: t.state for t in study.trials}
    assert sorted(states) == list(range(8))
    assert set(states.values()) <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = {n for n, s in states.items() if s == TrialState.PRUNED}
    assert pruned, "no trial was pruned"
    # one child run per trial, pruned ones marked in MLflow (tag + KILLED), the others FINISHED
    by_trial = {int(r.data.tags["vqkit.sweep.trial"]): r for r in children}
    assert len(children) == 8 and sorted(by_trial) == list(range(8))
    for number, run in by_trial.items():
        if number in pruned:
            assert run.info.status == "KILLED" and 10 <= int(run.data.tags["vqkit.pruned"]) < 30
        else:
            assert run.info.status == "FINISHED" and "vqkit.pruned" not in run.data.tags
            assert study.trials[number].value == pytest.approx(run.data.metrics["eval/psnr"])
    # the parent shows the search: the space, the best child, the objective over trials
    best = max((r for n, r in by_trial.items() if n not in pruned), key=lambda r: r.data.metrics["eval/psnr"])
    assert again.data.tags["vqkit.sweep.best.eval/psnr"] == f"{best.info.run_name} ({best.info.run_id})"
    assert study.best_trial.number == int(best.data.tags["vqkit.sweep.trial"])
    assert again.data.tags["vqkit.sweep.pruned"] == str(len(pruned))
    assert '"log": true' in again.data.params["sweep.space.train.lr"]
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(again.info.run_id)}
    assert {"objective.png", "trials.csv", "space.json", "summary.md", "search"} <= artifacts
    # the whole study, downloaded from MLflow as a user would, is the sweep's own
    logged = _study_artifact(uri, again.info.run_id, tmp_path / "download2")
    assert {t.number: t.state for t in logged.trials} == states
    assert logged.best_trial.params == study.best_trial.params
    assert [t.intermediate_values for t in logged.trials] == [t.intermediate_values for t in study.trials]


def _study_artifact(uri: str, run_id: str, dst: Path) -> optuna.Study:
    """The study logged to the parent run, downloaded and loaded as docs/sweeps.md says."""
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="search/optuna.journal",
                                               dst_path=str(dst), tracking_uri=uri)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    return optuna.load_study(study_name="vqkit-sweep", storage=storage)


def test_the_childs_reporter_prunes_with_the_sweeps_pruner(tmp_path):
    """The pruner is not kept in the study's storage: a child must build the sweep's own (here
    1 startup trial, not Optuna's default 5), and a step reported twice (a resumed child) counts once."""
    from vqkit_optuna import OptunaReporter

    from vqkit.interfaces import Dimension, Objective, TrialOutcome

    search = OptunaSearch(OptunaSearch.Params(startup_trials=1), space={"a": Dimension(low=0.0, high=1.0)},
                          objective=Objective("eval/psnr", "max"), budget=3, state_dir=tmp_path)
    (first,) = search.ask(1)
    assert OptunaReporter(first.state).report(10, {"eval/psnr": 20.0}) is False
    search.tell(first, TrialOutcome("finished", 20.0))
    (second,) = search.ask(1)
    reporter = OptunaReporter(second.state)
    assert reporter.report(10, {"eval/psnr": 30.0}) is False  # better than the median: goes on
    assert reporter.report(10, {"eval/psnr": 5.0}) is False  # step 10 again (resumed): ignored
    assert reporter.report(20, {"eval/psnr": 5.0}) is False  # no finished trial reported step 20
    (third,) = search.ask(1)
    assert OptunaReporter(third.state).report(10, {"eval/psnr": 5.0}) is True  # behind: pruned
    assert reporter.study.pruner._n_startup_trials == 1


def test_a_data_parallel_child_is_pruned_on_every_rank_together(tmp_path, monkeypatch):
    """Cross-process pruning: a child trained with 2 processes (`vqkit train --nproc 2`, gloo),
    rank 0 opens the study from its file and reports; when the pruner says stop, both ranks stop
    at that step (no rank left waiting in a collective), the run ends KILLED with `vqkit.pruned`,
    and the study holds the child's report."""
    import os

    from vqkit_optuna import OptunaReporter

    from vqkit.interfaces import Dimension, Objective, TrialOutcome
    from vqkit.testing.sweeps import write_recipe
    from vqkit.train.trial import channel_env

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    search = OptunaSearch(OptunaSearch.Params(startup_trials=1), space={"train.lr": Dimension(low=1e-3, high=1e-2)},
                          objective=Objective("eval/psnr", "max"), budget=2, state_dir=tmp_path / "study")
    (first,) = search.ask(1)  # a finished trial far ahead at step 2: the next one is behind it there
    assert OptunaReporter(first.state).report(2, {"eval/psnr": 99.0}) is False
    search.tell(first, TrialOutcome("finished", 99.0))
    (second,) = search.ask(1)
    recipe = write_recipe(tmp_path, train={"steps": 8, "batch_size": 8, "log_every": 2, "eval_every": 2,
                                           "image_every": 8, "checkpoint_every": 8, "device": "cpu"})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               **channel_env({"vqkit.sweep.trial": "1"}, "optuna", second.state))
    proc = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", str(recipe), "--nproc", "2", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("stopped at step 2: pruned by the sweep's search") == 1, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sw").experiment_id])  # rank 0's only
    assert run.info.status == "KILLED" and run.data.tags["vqkit.pruned"] == "2"
    assert run.data.tags["vqkit.sweep.trial"] == "1"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(second.state["storage"]))
    trial = optuna.load_study(study_name="vqkit-sweep", storage=storage).trials[1]
    assert list(trial.intermediate_values) == [2]  # reported once, by rank 0
