"""The built-in launcher ``local``: a sweep's children as subprocesses on this machine.

Other launchers (``ray``, ``submitit``) are plugin distributions under ``plugins/``; they
register through the same ``vqkit_register_launchers`` hook.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Optional, Sequence, TextIO

from pydantic import Field

from vqkit import hookimpl
from vqkit.interfaces import Params
from vqkit.launching import process_environment
from vqkit.sweep import ChildJob, SchedulerLauncher


@dataclasses.dataclass(eq=False)
class _Child:
    """A started child: its process and the thread echoing its output (both ``None`` when
    its command could not be started)."""

    proc: subprocess.Popen | None
    reader: threading.Thread | None

    def ended(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def close(self) -> None:
        """Kill the child if it still runs, and free its output pipe once it is all echoed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        if not self.reader.is_alive():
            self.proc.stdout.close()


class LocalLauncher(SchedulerLauncher):
    """Children as subprocesses on this machine, `jobs` at a time, CPU threads split.

    With ``jobs > 1`` each child gets ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = the
    threads available (``$OMP_NUM_THREADS``, else the CPU count) divided by ``jobs``, unless
    ``threads`` is set. Each output line is echoed as ``[name] line`` and kept in the job's
    log file. On Ctrl-C or SIGTERM the running children get SIGTERM (they checkpoint and
    stop), those still running after :attr:`cancel_grace_s` are killed, and the interruption
    is re-raised. A command that cannot be started is a failed child (exit code 127).

    The in-flight bookkeeping is :class:`~vqkit.sweep.SchedulerLauncher`'s; the "scheduler"
    here is :mod:`subprocess`.
    """

    class Params(Params):
        threads: Optional[int] = Field(
            None, ge=1, description="CPU threads per child (default: the available threads divided by jobs; "
            "with one job, the child's own default)")

    #: seconds between two looks at the running children
    poll_s: float = 0.2

    def __init__(self, params: Params | None = None, *, jobs: int = 1, out: TextIO | None = None):
        super().__init__(params, jobs=jobs, out=out)
        self._threads: int | None = None
        self._started: list[_Child] = []

    def threads_per_job(self) -> int | None:
        if self.params.threads is not None:
            return self.params.threads
        if self.jobs == 1:
            return None
        total = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
        return max(1, total // self.jobs)

    def launch(self, jobs: Sequence[ChildJob], on_done: Callable | None = None) -> list[int]:
        """Run every job; returns their exit codes (in the order given)."""
        self._threads = self.threads_per_job()
        self._started = []
        try:
            return super().launch(jobs, on_done)
        except BaseException:
            for child in self._started:  # what outlived the grace period is killed
                child.close()
            raise
        finally:
            self._started = []

    # ------------------------------------------------------------------ SchedulerLauncher's seams
    def submit(self, job: ChildJob, env: dict[str, str], cwd: str) -> _Child:
        try:
            proc = subprocess.Popen(list(job.argv), env=process_environment(env, self._threads), cwd=cwd,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True, bufsize=1)
        except OSError as exc:  # the command cannot be started: a failed child
            self.echo(job.name, f"cannot start: {exc}")
            child = _Child(None, None)
        else:
            reader = threading.Thread(target=self._echo, args=(job, proc), daemon=True)
            reader.start()
            child = _Child(proc, reader)
        self._started.append(child)
        return child

    def wait(self, handles: list[_Child], timeout: float) -> list[_Child]:
        deadline = time.monotonic() + timeout
        while True:
            ended = [h for h in handles if h.ended()]
            if ended or time.monotonic() >= deadline:
                return ended
            time.sleep(self.poll_s)

    def exit_code(self, handle: _Child, job: ChildJob) -> int:
        if handle.proc is None:
            return 127
        handle.reader.join()  # ended: its output is echoed to the end
        handle.proc.stdout.close()
        return handle.proc.returncode

    def cancel(self, handle: _Child) -> None:
        if not handle.ended():
            handle.proc.send_signal(signal.SIGTERM)

    # ------------------------------------------------------------------ output
    def _echo(self, job: ChildJob, proc: subprocess.Popen) -> None:
        log = None
        if job.log is not None:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "a", encoding="utf-8")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                with self._lock:
                    print(f"[{job.name}] {line.rstrip()}", file=self.out, flush=True)
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()


@hookimpl
def vqkit_register_launchers(register):
    register("local", LocalLauncher)
