"""vqkit-optuna: the search ``optuna`` chooses a sweep's combinations with an Optuna sampler
(TPE by default) and prunes children on an evaluation metric.

The study lives in the sweep's parent run folder (``runs/<parent run id>/optuna.journal``,
Optuna's journal file storage; ``storage: sqlite`` for ``optuna.db``), so running the same
``vqkit sweep`` command again continues it: trials whose child was interrupted come back
with the same number and values (the child resumes from its checkpoint), then new ones are
asked until the budget is spent. Each child reports every evaluation of the objective metric
to its trial (``trial.report``) from inside ``vqkit train`` and stops when the pruner says so
(``trial.should_prune``); the sweep then tells the study the trial was pruned, and the child's
MLflow run carries the tag ``vqkit.pruned`` and ends ``KILLED``. A child opens the study itself
(from any process or node that reaches the file); a data-parallel child reports from rank 0.
The parent run carries a copy of the study as the artifact ``search/optuna.journal``
(:meth:`OptunaSearch.artifacts`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import Field

import vqkit
from vqkit.interfaces import Dimension, Objective, Params, Search, Trial, TrialOutcome, TrialReporter

__version__ = "0.1.0"

#: trials asked when the sweep gives no budget
DEFAULT_BUDGET = 20
_PRIMITIVE = (type(None), bool, int, float, str)


def _storage(path: str):
    import optuna

    if path.endswith(".db"):
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(path))


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pruner(p):
    """The pruner the params name (built the same way by the sweep and inside each child)."""
    import optuna

    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials,
                                               n_warmup_steps=p.warmup_steps)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if p.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


class OptunaReporter(TrialReporter):
    """Inside a child: reports the objective metric to the trial, asks the pruner."""

    def __init__(self, state: Mapping[str, Any]):
        import optuna

        _quiet()
        self.metric = state["metric"]
        # the study's pruner is not kept in its storage: the child builds the sweep's own
        params = OptunaSearch.Params.model_validate(state["params"])
        self.study = optuna.load_study(study_name=state["study"], storage=_storage(state["storage"]),
                                       pruner=_pruner(params))
        self.trial = optuna.trial.Trial(self.study, int(state["trial_id"]))

    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        frozen = self.study._storage.get_trial(self.trial._trial_id)
        if step not in frozen.intermediate_values:  # a resumed child evaluates a step again: once is enough
            self.trial.report(float(value), step)
        return bool(self.trial.should_prune())


class OptunaSearch(Search):
    """Optuna sampler (TPE by default) over the space; prunes children on the objective metric."""

    adaptive = True
    prunes = True

    class Params(Params):
        sampler: Literal["tpe", "random", "qmc", "gp"] = Field("tpe", description="Optuna sampler")
        pruner: Literal["median", "percentile", "hyperband", "successive-halving", "none"] = Field(
            "median", description="Optuna pruner applied to the objective metric at each evaluation")
        startup_trials: int = Field(3, ge=0, description="trials before the sampler models the space and before "
                                    "the median/percentile pruner prunes")
        warmup_steps: int = Field(0, ge=0, description="training steps before a child may be pruned")
        percentile: float = Field(25.0, gt=0, lt=100, description="the percentile pruner's percentile")
        study_name: str = Field("vqkit-sweep", description="name of the study in its storage")
        storage: Literal["journal", "sqlite"] = Field(
            "journal", description="journal: optuna.journal in the parent run folder; sqlite: optuna.db there")
        seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="sampler seed (default: the recipe's seed)")

    def __init__(self, params: Params | None = None, *, space: Mapping[str, Dimension],
                 objective: Objective | None = None, budget: int | None = None, seed: int = 0,
                 state_dir: Any = None):
        import optuna

        _quiet()
        self.params = p = params or self.Params()
        self.space = dict(space)
        self.objective = objective or Objective()
        self.budget = DEFAULT_BUDGET if budget is None else int(budget)
        folder = Path(state_dir) if state_dir is not None else None
        if folder is None:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="vqkit-optuna-"))
        folder.mkdir(parents=True, exist_ok=True)
        self.storage_path = str((folder / ("optuna.db" if p.storage == "sqlite" else "optuna.journal")).resolve())
        s = seed if p.seed is None else p.seed
        samplers = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=s, n_startup_trials=p.startup_trials),
            "random": lambda: optuna.samplers.RandomSampler(seed=s),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=s),
            "gp": lambda: optuna.samplers.GPSampler(seed=s, n_startup_trials=p.startup_trials),
        }
        self.study = optuna.create_study(
            study_name=p.study_name, storage=_storage(self.storage_path), sampler=samplers[p.sampler](),
            pruner=_pruner(p), load_if_exists=True,
            direction="maximize" if self.objective.direction == "max" else "minimize")
        self._encoded = {k: not all(isinstance(c, _PRIMITIVE) for c in d.choices)
                         for k, d in self.space.items() if d.is_choice}
        self.distributions = {k: self._distribution(k, d) for k, d in self.space.items()}
        self._handed: set[int] = set()

    def _distribution(self, key: str, d: Dimension):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if d.is_choice:  # lists and mappings as JSON text (Optuna's choices are scalars)
            return CategoricalDistribution([json.dumps(c) for c in d.choices] if self._encoded[key] else list(d.choices))
        if d.integer:
            return IntDistribution(int(d.low), int(d.high), log=d.log)
        return FloatDistribution(float(d.low), float(d.high), log=d.log)

    def _trial(self, frozen) -> Trial:
        values = {}
        for key in self.space:
            v = frozen.params[key]
            values[key] = json.loads(v) if self._encoded.get(key) else v
        state = {"storage": self.storage_path, "study": self.params.study_name, "trial_id": frozen._trial_id,
                 "metric": self.objective.metric, "params": self.params.model_dump(mode="json")}
        return Trial(frozen.number, values, state)

    def ask(self, n: int | None = None) -> list[Trial]:
        from optuna.trial import TrialState

        want = n if n is not None else 1
        out = []
        # trials left running by an interrupted sweep come back first, with the same number and values
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if len(out) < want and frozen.number not in self._handed and set(frozen.params) == set(self.space):
                self._handed.add(frozen.number)
                out.append(self._trial(frozen))
        while len(out) < want and len(self.study.get_trials(deepcopy=False)) < self.budget:
            trial = self.study.ask(self.distributions)
            self._handed.add(trial.number)
            out.append(self._trial(self.study._storage.get_trial(trial._trial_id)))
        return out

    def tell(self, trial: Trial, outcome: TrialOutcome) -> None:
        from optuna.trial import TrialState

        frozen = self.study._storage.get_trial(int(trial.state["trial_id"]))
        if frozen.state.is_finished():
            return
        if outcome.status == "finished" and outcome.value is not None:
            self.study.tell(trial.number, outcome.value)
        elif outcome.status == "pruned":
            self.study.tell(trial.number, state=TrialState.PRUNED)
        else:
            self.study.tell(trial.number, state=TrialState.FAIL)

    def artifacts(self) -> list[Path]:
        """A copy of the study's storage taken now (under the journal's own lock, or through
        SQLite's backup API), next to it in ``study/``: the sweep logs it to the parent run
        as ``search/optuna.journal`` (``search/optuna.db``)."""
        src = Path(self.storage_path)
        if not src.exists():
            return []
        dst = src.parent / "study" / src.name
        dst.parent.mkdir(exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        if self.params.storage == "sqlite":
            import sqlite3

            with sqlite3.connect(str(src)) as a, sqlite3.connect(str(tmp)) as b:
                a.backup(b)
            b.close()
            a.close()
        else:
            import shutil

            from optuna.storages.journal import JournalFileSymlinkLock

            lock = JournalFileSymlinkLock(str(src))  # the lock Optuna's journal writers take
            lock.acquire()
            try:
                shutil.copyfile(src, tmp)
            finally:
                lock.release()
        tmp.replace(dst)
        return [dst]

    @classmethod
    def trial_reporter(cls, state: Mapping[str, Any]) -> TrialReporter | None:
        return OptunaReporter(state) if state else None


@vqkit.hookimpl
def vqkit_register_searches(register):
    register("optuna", OptunaSearch)
