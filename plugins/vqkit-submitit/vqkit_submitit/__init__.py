"""vqkit-submitit: the launcher ``submitit`` runs a sweep's children as Slurm jobs.

Each child is one job submitted through `submitit <https://github.com/facebookincubator/submitit>`_
(``AutoExecutor``: Slurm when ``sbatch`` is available, else local processes; ``cluster:
local`` forces submitit's local executor, which the tests use). The job runs the child's
ordinary ``vqkit train`` command and keeps its output in the sweep's ``children/`` folder.
When Slurm stops a job (``scancel``, time limit, preemption) it sends SIGTERM to the
job's processes: the child checkpoints and ends ``KILLED``, and rerunning the same ``vqkit
sweep`` command resumes it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, TextIO

from pydantic import Field

import vqkit
from vqkit.interfaces import Launcher, Params

__version__ = "0.1.0"

#: driver environment variables every child gets (where it logs, how vqkit behaves)
FORWARDED_PREFIXES = ("MLFLOW_", "VQKIT_")


def run_child(argv: Sequence[str], env: dict[str, str], cwd: str | None, threads: int, log: str | None) -> int:
    """Body of a child's job: run its ``vqkit train`` command, output into ``log``; returns its
    exit code. On SIGINT (submitit's cancel of a local job) the child gets SIGTERM, so it
    checkpoints and stops."""
    argv = list(argv)
    if argv and not os.path.exists(argv[0]):
        argv[0] = sys.executable
    full = dict(os.environ)
    full.update(env)
    full["OMP_NUM_THREADS"] = full["MKL_NUM_THREADS"] = str(max(1, threads))
    full["PYTHONUNBUFFERED"] = "1"
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, env=full, cwd=cwd if cwd and os.path.isdir(cwd) else None, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


class SubmititLauncher(Launcher):
    """Children as Slurm jobs through submitit (cluster: local runs them as local processes)."""

    class Params(Params):
        cluster: Optional[Literal["slurm", "local", "debug"]] = Field(
            None, description="submitit cluster: slurm, local (processes on this machine) or debug (in this "
            "process); default: slurm when sbatch is available, else local")
        folder: str = Field("runs/submitit", description="where submitit keeps job scripts and its own logs "
                            "(on a file system the nodes share)")
        timeout_min: int = Field(60, ge=1, description="time limit of each child's job, minutes")
        cpus_per_task: int = Field(1, ge=1, description="CPUs of each child's job (its OMP_NUM_THREADS)")
        gpus_per_node: int = Field(0, ge=0, description="GPUs of each child's job (use with train.device: cuda)")
        mem_gb: Optional[int] = Field(None, ge=1, description="memory of each child's job, GB (default: the "
                                        "cluster's)")
        slurm_partition: Optional[str] = Field(None, description="Slurm partition")
        slurm_additional_parameters: dict[str, Any] = Field(
            default_factory=dict, description="more sbatch options, e.g. {account: ..., qos: ...}")
        poll_s: float = Field(1.0, gt=0, description="seconds between checks of the jobs' states")

    def __init__(self, params: Params | None = None, *, jobs: int = 1, out: TextIO | None = None):
        self.params = params or self.Params()
        self.jobs = max(1, int(jobs))
        self.out = out or sys.stdout

    def executor(self):
        import submitit

        p = self.params
        executor = submitit.AutoExecutor(folder=p.folder, cluster=p.cluster)
        kwargs: dict[str, Any] = {"timeout_min": p.timeout_min, "cpus_per_task": p.cpus_per_task,
                                  "gpus_per_node": p.gpus_per_node, "name": "vqkit-child"}
        if p.mem_gb is not None:
            kwargs["mem_gb"] = p.mem_gb
        if executor.cluster == "slurm":
            if p.slurm_partition:
                kwargs["slurm_partition"] = p.slurm_partition
            if p.slurm_additional_parameters:
                kwargs["slurm_additional_parameters"] = dict(p.slurm_additional_parameters)
        executor.update_parameters(**kwargs)
        return executor

    def launch(self, jobs: Sequence[Any], on_done: Callable | None = None) -> list[int]:
        executor = self.executor()
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
        cwd = os.getcwd()
        codes: list[int | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        running: dict[int, Any] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    i = pending.pop(0)
                    job = jobs[i]
                    log = str(job.log) if job.log is not None else None
                    running[i] = executor.submit(run_child, list(job.argv), {**forwarded, **job.env}, cwd,
                                                 self.params.cpus_per_task, log)
                    print(f"[{job.name}] submitted as job {running[i].job_id} ({executor.cluster})",
                          file=self.out, flush=True)
                for i, sub in list(running.items()):
                    if not sub.done():
                        continue
                    del running[i]
                    job = jobs[i]
                    try:
                        code = int(sub.result())
                    except Exception as exc:  # the job failed, was cancelled or its node was lost
                        code = -1
                        print(f"[{job.name}] job {sub.job_id} did not complete: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}", file=self.out, flush=True)
                    if job.log is not None and job.log.exists():
                        for line in job.log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:]:
                            print(f"[{job.name}] {line}", file=self.out, flush=True)
                    codes[i] = code
                    if on_done is not None:
                        on_done(job, code)
                if running:
                    time.sleep(self.params.poll_s)
        except BaseException:
            for sub in running.values():
                sub.cancel(check=False)  # local: SIGINT -> the child gets SIGTERM; slurm: scancel -> SIGTERM
            deadline = time.monotonic() + 120
            while any(not s.done() for s in running.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            raise
        return [int(c) for c in codes]  # type: ignore[arg-type]

    @classmethod
    def example_params(cls, workdir) -> "SubmititLauncher.Params":
        """The contract suite's: submitit's local executor."""
        return cls.Params(cluster="local", folder=str(Path(workdir) / "submitit"), poll_s=0.2)


@vqkit.hookimpl
def vqkit_register_launchers(register):
    register("submitit", SubmititLauncher)
