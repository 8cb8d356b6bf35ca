"""What runs where a launcher places a sweep's child (a Ray worker, a Slurm job, a pool
process): :func:`run_child`, the driver's environment every child gets
(:func:`child_environment`), and a child process's whole environment, its CPU threads
included (:func:`process_environment`, also the ``local`` launcher's). Standard library
only: unpickling :func:`run_child` in a fresh job process costs no torch import (the child's
own ``vqkit train`` imports what it needs). Launchers use these through
:class:`vqkit.sweep.SchedulerLauncher`."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["FORWARDED_PREFIXES", "child_environment", "process_environment", "run_child"]

#: prefixes of the driver's environment variables every child gets wherever it runs (where
#: it logs: ``MLFLOW_TRACKING_URI``; how vqkit behaves: ``VQKIT_*``)
FORWARDED_PREFIXES = ("MLFLOW_", "VQKIT_")


def child_environment(job: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a child needs from the driver's environment, wherever it runs: the forwarded
    variables (:data:`FORWARDED_PREFIXES`), then the job's own (its trial)."""
    environ = os.environ if environ is None else environ
    return {**{k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}, **job.env}


def process_environment(env: Mapping[str, str], threads: int | None) -> dict[str, str]:
    """The whole environment of a child process started here: this machine's environment,
    ``env`` laid over it, ``threads`` (when given) as ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``, and ``PYTHONUNBUFFERED=1`` (its output comes line by line)."""
    full = dict(os.environ)
    full.update(env)
    if threads is not None:
        full["OMP_NUM_THREADS"] = full["MKL_NUM_THREADS"] = str(max(1, int(threads)))
    full["PYTHONUNBUFFERED"] = "1"
    return full


def run_child(argv: Sequence[str], env: Mapping[str, str], cwd: str | None, threads: int | None,
              log: str | None = None) -> tuple[int, str]:
    """Run one child's command where a launcher placed it (a Ray worker, a Slurm job, ...) and
    return ``(exit code, output)``.

    The command's Python is the driver's when that path exists here, else this process's own;
    ``env`` is laid over this machine's environment and ``threads`` sets ``OMP_NUM_THREADS``
    (:func:`process_environment`); the working directory is ``cwd`` when it exists here.
    With ``log`` the output goes to that file (on a file system the driver shares) and ``""``
    is returned; without, it is returned. When this call is interrupted (``KeyboardInterrupt``: a cancelled Ray task or
    local submitit job) the child gets SIGTERM, so it checkpoints and stops, and the
    interruption goes on (Slurm's ``scancel`` and time limit signal every process of the job,
    the child included)."""
    import subprocess

    argv = list(argv)
    if argv and not os.path.exists(argv[0]):
        argv[0] = sys.executable
    full = process_environment(env, threads)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "a", encoding="utf-8") if log else subprocess.PIPE
    try:
        proc = subprocess.Popen(argv, env=full, cwd=cwd if cwd and os.path.isdir(cwd) else None, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        try:
            text, _ = proc.communicate()
        except BaseException:
            proc.terminate()
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
        return proc.returncode, text or ""
    finally:
        if log:
            out.close()
