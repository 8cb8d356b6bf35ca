"""Searches (which combinations a sweep trains): the built-in random search's draws, the space
checked and located before anything runs, a random sweep whose parent run shows the search,
and the generic channel through which a search prunes a child (`vqkit train` stops, resumable)."""
from __future__ import annotations

import json
import math
import types

import pytest

from vqkit import hookimpl
from vqkit.cli import main
from vqkit.components.searches import GridSearch, RandomSearch
from vqkit.interfaces import Dimension, Search, TrialReporter
from vqkit.plugins import build_registry
from vqkit.testing.sweeps import sqlite_store, sweep_runs, write_recipe
from vqkit.train.trial import TRIAL_ENV, channel_env

SPACE = {"train.lr": Dimension(low=1e-4, high=1e-1, log=True), "quantizer.params.codebook_size": Dimension(
    choices=(8, 16)), "encoder.params.latent_dim": Dimension(low=4, high=16, integer=True)}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(TRIAL_ENV, raising=False)
    return tmp_path


def _draws(seed: int, budget: int) -> list[dict]:
    return [t.values for t in RandomSearch(space=SPACE, budget=budget, seed=seed).ask(None)]


def test_random_search_draws_in_the_space_reproducibly_and_log_uniformly():
    draws = _draws(3, 200)
    assert len(draws) == 200 and len({json.dumps(d, sort_keys=True) for d in draws}) == 200
    for d in draws:
        assert 1e-4 <= d["train.lr"] <= 1e-1 and d["train.lr"] == float(f"{d['train.lr']:.4g}")  # 4 digits
        assert d["quantizer.params.codebook_size"] in (8, 16)
        assert isinstance(d["encoder.params.latent_dim"], int) and 4 <= d["encoder.params.latent_dim"] <= 16
    # log-uniform: half the draws below the geometric middle (a uniform range would put ~3% there)
    below = sum(d["train.lr"] < math.sqrt(1e-4 * 1e-1) for d in draws) / len(draws)
    assert 0.35 < below < 0.65, below
    assert _draws(3, 5) == draws[:5] and _draws(4, 5) != draws[:5]  # the seed decides; a rerun gets the same
    # a small space of choices runs out: fewer trials, never the same twice
    small = RandomSearch(space={"k": Dimension(choices=(1, 2))}, budget=5, seed=0).ask(None)
    assert sorted(t.values["k"] for t in small) == [1, 2]
    assert GridSearch.space_problems(SPACE).keys() == {"train.lr", "encoder.params.latent_dim"}


def test_the_space_is_checked_and_located_before_anything_runs(workdir, capsys):
    recipe = write_recipe(workdir, sweep={
        "search": {"name": "random", "params": {"sed": 1}},
        "space": {"train.lr": {"low": 0.1, "high": 0.01}, "train.batch_size": {"choices": [8], "log": True}},
        "launcher": {"name": "locl"}})
    assert main(["sweep", str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("vqkit: error:")]
    assert "Traceback" not in err and len(lines) == 4, err
    text = recipe.read_text().splitlines()
    row = next(i for i, x in enumerate(text) if "train.lr" in x) + 2  # its value, the line below
    assert any(f"{recipe}:{row}:" in x and "sweep.space.train.lr" in x and "low (0.1) is above high (0.01)" in x
               for x in lines), err
    assert any("sweep.space.train.batch_size" in x and "log and integer apply to ranges" in x for x in lines), err
    assert any("sweep.launcher.name: unknown launcher 'locl'" in x and "did you mean 'local'" in x for x in lines)
    assert any("sweep.search.params.sed: unknown key 'sed'" in x and "did you mean 'seed'" in x for x in lines)

    plain = write_recipe(workdir, "plain.yaml")
    # the ends of a range are validated against the components' params, located at --space
    assert main(["sweep", str(plain), "--search", "random", "--space",
                 "train.batch_size={low: -4, high: 8, integer: true}"]) == 2
    err = capsys.readouterr().err
    assert "vqkit: error: --space train.batch_size: train.batch_size: " in err and "-4" in err, err
    # the grid takes choices only
    assert main(["sweep", str(plain), "--space", "train.lr={low: 1.0e-4, high: 0.01}"]) == 2
    assert "--space train.lr: the grid search takes a list of choices, not a range" in capsys.readouterr().err
    assert main(["sweep", str(plain), "--space", "train.lr"]) == 2
    assert "--space expects KEY.PATH=SPEC" in capsys.readouterr().err
    assert main(["sweep", str(plain), "--search", "optimus", "--grid", "train.lr=0.1"]) == 2
    assert "unknown search 'optimus'" in capsys.readouterr().err
    assert not (workdir / "runs").exists()  # nothing started


def test_a_random_sweep_and_its_parent_run_show_the_search(workdir, capsys):
    uri = sqlite_store(workdir)
    recipe = write_recipe(workdir)
    argv = ["sweep", str(recipe), "--search", "random", "--budget", "2", "--jobs", "2",
            "--space", "train.lr={low: 1.0e-3, high: 1.0e-2, log: true}"]
    assert main(argv) == 0
    (parent,), children = sweep_runs(uri)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.tags["vqkit.sweep.trial"] for r in children) == ["0", "1"]
    for r in children:  # named for the value drawn, which is the value trained
        assert r.info.run_name == f"lr={float(r.data.params['train.lr']):g}"
    assert parent.info.run_name == "tiny sweep lr (random)"
    assert parent.data.params["sweep.search"] == "random"
    assert json.loads(parent.data.params["sweep.space.train.lr"]) == {
        "low": 0.001, "high": 0.01, "log": True, "integer": False}
    best = max(children, key=lambda r: r.data.metrics["eval/psnr"])
    assert parent.data.tags["vqkit.sweep.best.eval/psnr"] == f"{best.info.run_name} ({best.info.run_id})"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert {"objective.png", "trials.csv", "space.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    trials = (workdir / "runs" / parent.info.run_id / "trials.csv").read_text().splitlines()
    assert trials[0] == "trial,run,state,eval/psnr,run_id" and len(trials) == 3
    assert all(",finished," in row for row in trials[1:])
    capsys.readouterr()
    assert main(argv) == 0  # the same draws again: both children skipped
    assert "2 of 2 already finished, skipped" in capsys.readouterr().err


class _Reporter(TrialReporter):
    def __init__(self, at: int, seen: list):
        self.at, self.seen = at, seen

    def report(self, step, metrics):
        self.seen.append((step, sorted(metrics)))
        return step >= self.at


class StopAt(Search):
    """Test search: prunes its children at the step its trial state names."""

    prunes = True
    seen: list = []

    def ask(self, n=None):
        return []

    @classmethod
    def trial_reporter(cls, state):
        return _Reporter(state["at"], cls.seen)


def test_a_search_prunes_a_child_which_stays_resumable(workdir, use_registry, monkeypatch, capsys):
    plugin = types.SimpleNamespace(vqkit_register_searches=hookimpl(lambda register: register("stop-at", StopAt)))
    use_registry(build_registry(extra_plugins=[("stopper", plugin)]))
    uri = sqlite_store(workdir)
    recipe = write_recipe(workdir, train={"steps": 6, "batch_size": 16, "log_every": 2, "eval_every": 2,
                                          "image_every": 6, "checkpoint_every": 6, "device": "cpu"})
    monkeypatch.setenv(TRIAL_ENV, channel_env({"vqkit.sweep.trial": "5"}, "stop-at", {"at": 4})[TRIAL_ENV])
    assert main(["train", str(recipe)]) == 0
    assert "stopped at step 4: pruned by the sweep's search" in capsys.readouterr().err
    assert [step for step, _ in StopAt.seen] == [2, 4]  # every evaluation, until it said stop
    assert all({"eval/psnr", "eval/ssim"} <= set(keys) for _, keys in StopAt.seen)
    from mlflow import MlflowClient

    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("sw").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["vqkit.pruned"] == "4"
    assert run.data.tags["vqkit.sweep.trial"] == "5"
    # the pruned child kept a checkpoint: it can be trained to the end later
    monkeypatch.delenv(TRIAL_ENV)
    assert main(["train", "--resume", run.info.run_id]) == 0
    run = MlflowClient(uri).get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vqkit.resumed_from_step"] == "4"


def test_a_sweep_too_large_to_run_is_refused_at_once(workdir, capsys):
    """A budget or a grid past MAX_TRIALS children is one error before any planning (it hung,
    even with --dry-run); a budget keeps the first N of a large grid."""
    from vqkit.interfaces import MAX_TRIALS

    recipe = str(write_recipe(workdir))
    grid = [arg for key in ("train.lr", "train.steps", "train.batch_size", "seed", "train.log_every")
            for arg in ("--grid", f"{key}=" + ",".join(str(v) for v in range(1, 11)))]
    assert main(["sweep", recipe, "--dry-run", *grid]) == 2
    assert f"the grid has 100,000 combinations, more than a sweep runs ({MAX_TRIALS:,})" in capsys.readouterr().err
    assert main(["sweep", recipe, "--dry-run", "--search", "random", "--space", "train.lr={low: 1e-4, high: 1e-3}",
                 "--budget", str(10**20)]) == 2
    assert f"sweep.budget: Input should be less than or equal to {MAX_TRIALS}" in capsys.readouterr().err
    assert main(["sweep", recipe, "--dry-run", "--budget", "3", *grid]) == 0
    assert "3 children" in capsys.readouterr().out
