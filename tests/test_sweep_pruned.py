"""`vqkit sweep` says how each child ended: a child its search pruned is "pruned at step N",
not "finished", when it stops and when a rerun skips it. The pruning search is a plugin of a
fake installed distribution, so the children (`vqkit train` subprocesses) load it too."""
from __future__ import annotations

import re

from vqkit.cli import main
from vqkit.plugins import build_registry
from vqkit.testing import install_fake_distribution
from vqkit.testing.sweeps import sqlite_store, sweep_runs, write_recipe
from vqkit.train.trial import TRIAL_ENV

PRUNE_SECOND = '''
from vqkit import hookimpl
from vqkit.components.searches import GridSearch
from vqkit.interfaces import Trial, TrialReporter


class _StopAt(TrialReporter):
    def __init__(self, at):
        self.at = at

    def report(self, step, metrics):
        return self.at is not None and step >= self.at


class PruneSecond(GridSearch):
    """The grid; its second trial is pruned at its first evaluation at or after step 2."""

    prunes = True

    def ask(self, n=None):
        return [Trial(t.number, t.values, {"at": 2 if t.number == 1 else None}) for t in super().ask(n)]

    @classmethod
    def trial_reporter(cls, state):
        return _StopAt(state.get("at"))


@hookimpl
def vqkit_register_searches(register):
    register("prune-second", PruneSecond)
'''


def test_a_pruned_child_is_reported_pruned_at_its_step(tmp_path, monkeypatch, capsys, use_registry):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(TRIAL_ENV, raising=False)
    uri = sqlite_store(tmp_path)
    recipe = write_recipe(tmp_path, train={"steps": 4, "batch_size": 16, "log_every": 2, "eval_every": 2,
                                           "image_every": 4, "checkpoint_every": 4, "device": "cpu"})
    dist = tmp_path / "dist"
    with install_fake_distribution(dist, "vqkit-prune-second", "0.1.0", {"vqkit_prune_second": PRUNE_SECOND},
                                   {"prune_second": "vqkit_prune_second"}):
        monkeypatch.setenv("PYTHONPATH", str(dist))  # the children find the distribution too
        use_registry(build_registry())
        argv = ["sweep", str(recipe), "--search", "prune-second", "--grid", "train.lr=0.001,0.002"]
        assert main(argv) == 0
        err = capsys.readouterr().err
        ended = re.findall(r"^vqkit: sweep: (lr=\S+): (.*)$", err, re.M)
        assert ended == [("lr=0.001", "finished"), ("lr=0.002", "pruned at step 2")], err
        (parent,), children = sweep_runs(uri)
        assert sorted((r.info.run_name, r.info.status, r.data.tags.get("vqkit.pruned")) for r in children) == [
            ("lr=0.001", "FINISHED", None), ("lr=0.002", "KILLED", "2")]
        # the rerun skips both, and says which one was pruned
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "vqkit: sweep: 2 of 2 already finished or pruned, skipped: lr=0.001, lr=0.002 (pruned at step 2)" in err, err
