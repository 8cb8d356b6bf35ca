"""vqkit-ray: the launcher ``ray`` runs a sweep's children as Ray tasks.

Each child is one task declaring its needs (``num_cpus``, ``num_gpus``), so Ray places it on
a node with room; the task runs the child's ordinary ``vqkit train`` command there and hands
its output back. With no ``address`` the launcher uses the Ray connection the process
already has, else starts a local instance (and shuts it down after the sweep); with
``address: auto`` or ``ray://host:10001`` it joins an existing cluster.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

import vqkit
from vqkit.interfaces import Params
from vqkit.sweep import ChildJob, SchedulerLauncher, run_child

__version__ = "0.1.0"


class RayLauncher(SchedulerLauncher):
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

    def __init__(self, params: Params | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._started = False
        self._task = None

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        p = self.params
        if p.address is None:
            ray.init(num_cpus=p.local_cpus, include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=p.address, log_to_driver=False)
            except ConnectionError as exc:  # nothing there, or its token authentication refused us
                from vqkit.errors import VqkitError

                raise VqkitError(
                    f"sweep.launcher.params.address: cannot join the Ray cluster at {p.address} ({exc}); is it "
                    f"running (`ray start --head --port ...`), and, with token authentication (the default of "
                    f"`ray start --head`), are RAY_AUTH_MODE=token and its token (~/.ray/auth_token or "
                    f"RAY_AUTH_TOKEN) set for `vqkit sweep`?") from None
        self._started = True

    # the job bookkeeping is SchedulerLauncher's: here only how Ray runs, waits for and stops a child
    def submit(self, job: ChildJob, env: dict[str, str], cwd: str) -> Any:
        import ray

        if self._task is None:
            self._connect()
            p = self.params
            self._task = ray.remote(run_child).options(num_cpus=p.num_cpus, num_gpus=p.num_gpus,
                                                       max_retries=p.max_retries, name="vqkit-child")
        # no log file on the worker (it may not share the driver's file system): the output comes back
        return self._task.remote(list(job.argv), env, cwd, int(self.params.num_cpus))

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        import ray

        if not handles:
            return []
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready:  # and every other one already done
            more, _ = ray.wait([h for h in handles if h not in ready], num_returns=len(handles) - len(ready),
                               timeout=0) if len(handles) > len(ready) else ([], [])
            ready = [*ready, *more]
        return ready

    def exit_code(self, handle: Any, job: ChildJob) -> int:
        import ray

        code, output = ray.get(handle)  # a lost worker or node: RayError, exit code -1 (SchedulerLauncher)
        self.keep_output(job, output)
        self.echo(job.name, output)
        return int(code)

    def cancel(self, handle: Any) -> None:
        import ray

        ray.cancel(handle)  # KeyboardInterrupt in the task: SIGTERM to the child, which checkpoints

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
