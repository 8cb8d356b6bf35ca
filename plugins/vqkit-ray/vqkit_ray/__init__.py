"""vqkit-ray: the launcher ``ray`` runs a sweep's children as Ray tasks.

Each child is one task declaring its needs (``num_cpus``, ``num_gpus``), so Ray places it on
a node with room; the task runs the child's ordinary ``vqkit train`` command there and hands
its output back. With no ``address`` the launcher uses the Ray connection the process
already has, else starts a local instance (and shuts it down after the sweep); with
``address: auto`` or ``ray://host:10001`` it joins an existing cluster.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence, TextIO

from pydantic import Field

import vqkit
from vqkit.interfaces import Launcher, Params

__version__ = "0.1.0"

#: driver environment variables every child gets (where it logs, how vqkit behaves)
FORWARDED_PREFIXES = ("MLFLOW_", "VQKIT_")


def run_child(argv: Sequence[str], env: dict[str, str], cwd: str | None, threads: int) -> tuple[int, str]:
    """Body of a child's Ray task: run its ``vqkit train`` command; returns (exit code, output).

    The command's Python is the driver's when that path exists on the worker, else the
    worker's own. On cancellation (``ray.cancel``: KeyboardInterrupt) the child gets SIGTERM,
    so it checkpoints and stops, and the interruption goes on."""
    argv = list(argv)
    if argv and not os.path.exists(argv[0]):
        argv[0] = sys.executable
    full = dict(os.environ)
    full.update(env)
    full["OMP_NUM_THREADS"] = full["MKL_NUM_THREADS"] = str(max(1, threads))
    full["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(argv, env=full, cwd=cwd if cwd and os.path.isdir(cwd) else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return proc.returncode, out


class RayLauncher(Launcher):
    """Children as Ray tasks with their CPU/GPU needs declared (a local instance or a cluster)."""

    class Params(Params):
        address: Optional[str] = Field(
            None, description="Ray cluster to join: 'auto' (the cluster of this node), 'ray://HOST:10001' "
            "(Ray Client) or HOST:PORT; default: the connection this process already has, else a local "
            "instance started for the sweep and shut down after it")
        num_cpus: float = Field(1.0, gt=0, description="CPUs each child needs (its OMP_NUM_THREADS, rounded down)")
        num_gpus: float = Field(0.0, ge=0, description="GPUs each child needs (Ray sets CUDA_VISIBLE_DEVICES; "
                                "use with train.device: cuda)")
        local_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local instance the launcher starts "
                                          "(default: all of this machine)")
        max_retries: int = Field(0, ge=0, description="Ray retries of a child whose worker died (0: the sweep "
                                 "reports it; rerunning the sweep resumes it from its checkpoint)")

    def __init__(self, params: Params | None = None, *, jobs: int = 1, out: TextIO | None = None):
        self.params = params or self.Params()
        self.jobs = max(1, int(jobs))
        self.out = out or sys.stdout
        self._started = False
        self._lock = threading.Lock()

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        p = self.params
        if p.address is None:
            ray.init(num_cpus=p.local_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=p.address, log_to_driver=False)
        self._started = True

    def _echo(self, name: str, text: str) -> None:
        with self._lock:
            for line in text.splitlines():
                print(f"[{name}] {line}", file=self.out, flush=True)

    def launch(self, jobs: Sequence[Any], on_done: Callable | None = None) -> list[int]:
        import ray

        self._connect()
        p = self.params
        task = ray.remote(run_child).options(num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_retries=p.max_retries,
                                             name="vqkit-child")
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
        cwd = os.getcwd()
        codes: list[int | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        running: dict[Any, int] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    i = pending.pop(0)
                    job = jobs[i]
                    running[task.remote(list(job.argv), {**forwarded, **job.env}, cwd, int(p.num_cpus))] = i
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    i = running.pop(ref)
                    job = jobs[i]
                    try:
                        code, output = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker or its node was lost
                        code, output = -1, f"vqkit-ray: the child's task failed: {type(exc).__name__}: {exc}\n"
                    if job.log is not None:
                        job.log.parent.mkdir(parents=True, exist_ok=True)
                        with open(job.log, "a", encoding="utf-8") as f:
                            f.write(output)
                    self._echo(job.name, output)
                    codes[i] = int(code)
                    if on_done is not None:
                        on_done(job, int(code))
        except BaseException:
            for ref in running:
                ray.cancel(ref)  # KeyboardInterrupt in the task: SIGTERM to the child, which checkpoints
            deadline = time.monotonic() + 120
            for ref in running:
                try:
                    ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except Exception:  # cancelled, as asked
                    pass
            raise
        return [int(c) for c in codes]  # type: ignore[arg-type]

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    @classmethod
    def example_params(cls, workdir) -> "RayLauncher.Params":
        """The contract suite's: a local instance of 2 CPUs."""
        return cls.Params(local_cpus=2)


@vqkit.hookimpl
def vqkit_register_launchers(register):
    register("ray", RayLauncher)
