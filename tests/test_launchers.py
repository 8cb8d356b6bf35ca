"""The built-in launcher `local`: CPU threads split between children in flight, a command that
cannot start is a failed child (the others run), and an interruption reaches the running
children as SIGTERM (they checkpoint) before it goes on. Unknown launchers are user errors."""
from __future__ import annotations

import io
import sys

import pytest

from vqkit.cli import main
from vqkit.components.launchers import LocalLauncher
from vqkit.sweep import ChildJob
from vqkit.testing.sweeps import write_recipe

SHOW_THREADS = "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"


def _job(name, code, log=None, env=None):
    return ChildJob(name, (sys.executable, "-c", code), env or {}, log=log)


def test_threads_are_split_between_children_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    jobs = [_job(f"j{i}", SHOW_THREADS, log=tmp_path / f"{i}.log") for i in range(2)]
    out = io.StringIO()
    assert LocalLauncher(jobs=2, out=out).launch(jobs) == [0, 0]
    assert all("threads 2" in (tmp_path / f"{i}.log").read_text() for i in range(2))
    assert "[j0] threads 2" in out.getvalue()  # echoed with the child's name
    one = LocalLauncher(LocalLauncher.Params(threads=3), jobs=2, out=io.StringIO())
    assert one.threads_per_job() == 3
    assert LocalLauncher(jobs=1).threads_per_job() is None  # one child: its own default


def test_a_command_that_cannot_start_fails_alone(tmp_path):
    jobs = [ChildJob("missing", (str(tmp_path / "no-such-python"), "-c", "pass")), _job("ok", "print(1)")]
    done = []
    codes = LocalLauncher(jobs=1, out=io.StringIO()).launch(jobs, lambda job, code: done.append((job.name, code)))
    assert codes == [127, 0] and done == [("missing", 127), ("ok", 0)]


def test_an_interruption_reaches_the_running_children_as_sigterm(tmp_path):
    marker = tmp_path / "got-sigterm"
    slow = ("import signal, sys, time, pathlib\n"
            "def stop(*a):\n"
            f"    pathlib.Path({str(marker)!r}).write_text('checkpointed'); sys.exit(130)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    log = tmp_path / "slow.log"
    wait = (f"import pathlib, time\np = pathlib.Path({str(log)!r})\n"
            "while not (p.exists() and 'ready' in p.read_text()):\n    time.sleep(0.05)\n")
    jobs = [_job("slow", slow, log=log), _job("quick", wait)]  # quick ends once slow handles SIGTERM

    def on_done(job, code):
        if job.name == "quick":  # the sweep is interrupted (Ctrl-C) while `slow` runs
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LocalLauncher(jobs=2, out=io.StringIO()).launch(jobs, on_done)
    assert marker.read_text() == "checkpointed"


def test_an_unknown_launcher_is_a_located_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path)
    assert main(["sweep", str(recipe), "--grid", "train.lr=0.1", "--launcher", "lokal"]) == 2
    err = capsys.readouterr().err
    assert "vqkit: error: --launcher: sweep.launcher.name: unknown launcher 'lokal' (did you mean 'local'?" in err, err
    assert main(["components", "launcher"]) == 0
    assert "local" in capsys.readouterr().out


def _doc_launcher():
    """The example launcher of docs/plugins.md (section "Launcher"), executed as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    section = re.search(r"^## Launcher\n(.*?)(?=^## )", doc, re.S | re.M).group(1)
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {"__name__": "doc_launcher"}
    exec(compile(code, "docs/plugins.md#launcher", "exec"), namespace)
    return namespace


def test_the_documented_scheduler_launcher_passes_the_contract_and_gets_the_bookkeeping(tmp_path):
    """A third-party launcher written on vqkit.sweep.SchedulerLauncher (the docs' example) gets
    the shared job bookkeeping: forwarded environment, codes in order, a lost worker as -1."""
    import os

    from vqkit.testing import contract_checks

    ns = _doc_launcher()
    cls = ns["PoolLauncher"]
    for check in contract_checks("launchers"):
        check(cls)
    # the driver's MLFLOW_*/VQKIT_* variables reach the child; a child whose worker dies is -1
    os.environ["VQKIT_DOC_PROBE"] = "forwarded"
    try:
        die = "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"  # kills its pool worker
        show = "import os; print('probe', os.environ.get('VQKIT_DOC_PROBE'))"
        out = io.StringIO()
        launcher = cls(jobs=1, out=out)
        try:
            codes = launcher.launch([_job("show", show, log=tmp_path / "show.log"), _job("die", die)])
        finally:
            launcher.close()
    finally:
        del os.environ["VQKIT_DOC_PROBE"]
    assert "probe forwarded" in (tmp_path / "show.log").read_text()
    assert codes == [0, -1] and "[die] PoolLauncher: the child did not complete: BrokenProcessPool" in out.getvalue()


def test_nproc_children_are_data_parallel_train_commands(tmp_path, monkeypatch, capsys):
    from vqkit.sweep import train_argv

    assert train_argv("r.yaml", ["a=1"], "PARENT", nproc=2)[-4:] == ("--parent-run", "PARENT", "--nproc", "2")
    assert "--nproc" not in train_argv("r.yaml", ["a=1"], "PARENT")
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path)
    assert main(["sweep", str(recipe), "--grid", "quantizer.params.codebook_size=8,16", "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vqkit: error: --nproc must be >= 1, got 0"
