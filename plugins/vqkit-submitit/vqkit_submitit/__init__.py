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

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

import vqkit
from vqkit.interfaces import Params
from vqkit.sweep import ChildJob, SchedulerLauncher, run_child

__version__ = "0.1.0"


class SubmititLauncher(SchedulerLauncher):
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

    def __init__(self, params: Params | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._executor = None

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

    # the job bookkeeping is SchedulerLauncher's: here only how submitit runs, waits for and stops a child
    def submit(self, job: ChildJob, env: dict[str, str], cwd: str) -> Any:
        if self._executor is None:
            self._executor = self.executor()
        log = str(job.log) if job.log is not None else None  # on the shared file system
        sub = self._executor.submit(run_child, list(job.argv), env, cwd, self.params.cpus_per_task, log)
        print(f"[{job.name}] submitted as job {sub.job_id} ({self._executor.cluster})", file=self.out, flush=True)
        return sub

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        import time

        deadline = time.monotonic() + min(timeout, self.params.poll_s)
        while True:
            done = [h for h in handles if h.done()]
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(min(0.2, self.params.poll_s))

    def exit_code(self, handle: Any, job: ChildJob) -> int:
        try:
            code, _ = handle.result()  # failed, cancelled or its node lost: raises, exit code -1
        finally:
            if job.log is not None and job.log.exists():
                self.echo(job.name, "\n".join(job.log.read_text(encoding="utf-8", errors="replace")
                                              .splitlines()[-3:]))
        return int(code)

    def cancel(self, handle: Any) -> None:
        handle.cancel(check=False)  # local: SIGINT -> the child gets SIGTERM; slurm: scancel -> SIGTERM

    @classmethod
    def example_params(cls, workdir) -> "SubmititLauncher.Params":
        """The contract suite's: submitit's local executor."""
        return cls.Params(cluster="local", folder=str(Path(workdir) / "submitit"), poll_s=0.2)


@vqkit.hookimpl
def vqkit_register_launchers(register):
    register("submitit", SubmititLauncher)
