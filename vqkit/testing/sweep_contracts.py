"""Contract checks every registered :class:`~vqkit.interfaces.Launcher` and
:class:`~vqkit.interfaces.Search` must pass (run over every registered one by vqkit's
``tests/test_contracts.py``; plugin authors: ``contract_checks("launchers")``).

Launchers (built from ``example_params`` or the default ``Params``, ``jobs=2``):

``runs_jobs``
    three tiny Python commands (one exits 3) each get their own environment, the exit codes
    come back in the order given, ``on_done`` is called once per job with its code, each
    job's output is kept in its ``log`` file; ``close()`` frees the launcher.

Searches (a space of 3 choices and a log-uniform range, or choices only when the search
refuses ranges through ``space_problems``; budget 4):

``trials``
    ``ask`` hands out trials with unique numbers whose values are in the space (keys, choices,
    range bounds, JSON-able ``state``), never more than the budget, then an empty list;
``rerun``
    a search built again with the same ``state_dir`` and seed (a rerun of the sweep) gives a
    trial whose outcome was never told (an interrupted child) back with the same number and
    values, and never reuses a number for other values.
"""
from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable

from vqkit.interfaces import Dimension, Objective, TrialOutcome
from vqkit.testing.contracts import example_params

__all__ = ["launcher_contract_checks", "search_contract_checks"]

Check = Callable[[type], None]

_SCRIPT = ("import os, sys; open(os.environ['VQKIT_TEST_OUT'], 'w').write(os.environ['VQKIT_TEST_TOKEN']); "
           "print('hello from', os.environ['VQKIT_TEST_TOKEN']); sys.exit(int(os.environ['VQKIT_TEST_CODE']))")


def check_launcher_runs_jobs(cls: type) -> None:
    from vqkit.sweep import ChildJob

    folder = Path(tempfile.mkdtemp(prefix="vqkit-launcher-"))
    jobs = []
    for i, code in enumerate((0, 3, 0)):
        env = {"VQKIT_TEST_OUT": str(folder / f"out{i}"), "VQKIT_TEST_TOKEN": f"job{i}",
               "VQKIT_TEST_CODE": str(code)}
        jobs.append(ChildJob(f"job{i}", (sys.executable, "-c", _SCRIPT), env, log=folder / f"{i}.log"))
    done: list[tuple[str, int]] = []
    launcher = cls(example_params(cls), jobs=2, out=io.StringIO())
    try:
        codes = launcher.launch(jobs, lambda job, code: done.append((job.name, code)))
    finally:
        launcher.close()
    assert list(codes) == [0, 3, 0], f"{cls.__name__}: exit codes {codes}, expected [0, 3, 0] in the order given"
    assert sorted(done) == [("job0", 0), ("job1", 3), ("job2", 0)], f"{cls.__name__}: on_done calls {done}"
    for i in range(3):
        out = folder / f"out{i}"
        assert out.exists() and out.read_text() == f"job{i}", f"{cls.__name__}: job{i} did not get its environment"
        log = folder / f"{i}.log"
        assert log.exists() and f"hello from job{i}" in log.read_text(), f"{cls.__name__}: job{i}'s output is not in its log"


def _space(cls: type) -> dict[str, Dimension]:
    space = {"a": Dimension(choices=(1, 2, 3)), "b": Dimension(low=1e-4, high=1e-1, log=True)}
    if cls.space_problems(space):
        space = {"a": Dimension(choices=(1, 2, 3)), "b": Dimension(choices=(0.5, 0.25))}
        assert not cls.space_problems(space), f"{cls.__name__}: refuses a space of choices"
    return space


def _search(cls: type, state_dir: Path):
    return cls(example_params(cls), space=_space(cls), objective=Objective("eval/psnr", "max"), budget=4,
               seed=7, state_dir=state_dir)


def _in_space(cls: type, space: dict[str, Dimension], values: dict) -> None:
    assert set(values) == set(space), f"{cls.__name__}: trial values {values} do not cover the space {list(space)}"
    for key, d in space.items():
        v = values[key]
        if d.is_choice:
            assert v in d.choices, f"{cls.__name__}: {key}={v!r} is not one of {d.choices}"
        else:
            assert d.low <= float(v) <= d.high, f"{cls.__name__}: {key}={v!r} outside [{d.low}, {d.high}]"


def _value(values: dict) -> float:
    return float(values["a"]) + math.log10(float(values["b"]))


def check_search_trials(cls: type) -> None:
    space = _space(cls)
    search = _search(cls, Path(tempfile.mkdtemp(prefix="vqkit-search-")))
    seen: dict[int, dict] = {}
    for _ in range(10):
        trials = search.ask(2)
        if not trials:
            break
        assert len(trials) <= 2, f"{cls.__name__}: ask(2) returned {len(trials)} trials"
        for t in trials:
            assert t.number not in seen, f"{cls.__name__}: trial number {t.number} handed out twice"
            _in_space(cls, space, t.values)
            json.dumps(t.state)
            seen[t.number] = dict(t.values)
            search.tell(t, TrialOutcome("finished", _value(t.values)))
    assert 0 < len(seen) <= 4, f"{cls.__name__}: {len(seen)} trials for a budget of 4"
    assert search.ask(2) == [], f"{cls.__name__}: more trials after the budget was spent"


def check_search_rerun(cls: type) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="vqkit-search-"))
    first = _search(cls, state_dir)
    trials = first.ask(2)
    assert trials, f"{cls.__name__}: no trial at all"
    told, untold = trials[0], trials[-1] if len(trials) > 1 else None
    first.tell(told, TrialOutcome("finished", _value(told.values)))
    again = _search(cls, state_dir)  # the same sweep run again: the untold child was interrupted
    second: dict[int, dict] = {}
    for _ in range(10):
        batch = again.ask(2)
        if not batch:
            break
        for t in batch:
            second[t.number] = dict(t.values)
            again.tell(t, TrialOutcome("finished", _value(t.values)))
    if untold is not None:
        assert second.get(untold.number) == untold.values, (
            f"{cls.__name__}: an interrupted trial ({untold.number}: {untold.values}) did not come back with "
            f"the same number and values on a rerun (got {second.get(untold.number)})")
    if told.number in second:
        assert second[told.number] == told.values, f"{cls.__name__}: trial {told.number} changed values on a rerun"


def launcher_contract_checks() -> list[Check]:
    return [check_launcher_runs_jobs]


def search_contract_checks() -> list[Check]:
    return [check_search_trials, check_search_rerun]
