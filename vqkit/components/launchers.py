"""The built-in launcher ``local``: a sweep's children as subprocesses on this machine.

Other launchers (``ray``, ``submitit``) are plugin distributions under ``plugins/``; they
register through the same ``vqkit_register_launchers`` hook.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence, TextIO

from pydantic import Field

from vqkit import hookimpl
from vqkit.interfaces import Launcher, Params


class LocalLauncher(Launcher):
    """Children as subprocesses on this machine, `jobs` at a time, CPU threads split.

    With ``jobs > 1`` each child gets ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = the
    threads available (``$OMP_NUM_THREADS``, else the CPU count) divided by ``jobs``, unless
    ``threads`` is set. Each output line is echoed as ``[name] line`` and kept in the job's
    log file. On Ctrl-C or SIGTERM the running children get SIGTERM (they checkpoint and
    stop) and the interruption is re-raised.
    """

    class Params(Params):
        threads: Optional[int] = Field(
            None, ge=1, description="CPU threads per child (default: the available threads divided by jobs; "
            "with one job, the child's own default)")

    def __init__(self, params: Params | None = None, *, jobs: int = 1, out: TextIO | None = None):
        self.params = params or self.Params()
        self.jobs = max(1, int(jobs))
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def threads_per_job(self) -> int | None:
        if self.params.threads is not None:
            return self.params.threads
        if self.jobs == 1:
            return None
        total = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
        return max(1, total // self.jobs)

    def launch(self, jobs: Sequence, on_done: Callable | None = None) -> list[int]:
        """Run every job; returns their exit codes (in the order given)."""
        codes: list[int | None] = [None] * len(jobs)
        running: dict[int, tuple[subprocess.Popen, threading.Thread]] = {}
        pending = list(range(len(jobs)))
        threads = self.threads_per_job()
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    i = pending.pop(0)
                    try:
                        running[i] = self._start(jobs[i], threads)
                    except OSError as exc:  # the command cannot be started: a failed child
                        print(f"[{jobs[i].name}] cannot start: {exc}", file=self.out, flush=True)
                        codes[i] = 127
                        if on_done is not None:
                            on_done(jobs[i], 127)
                for i, (proc, reader) in list(running.items()):
                    if proc.poll() is not None:
                        reader.join()
                        proc.stdout.close()
                        codes[i] = proc.returncode
                        del running[i]
                        if on_done is not None:
                            on_done(jobs[i], proc.returncode)
                time.sleep(0.2)
        except BaseException:
            for proc, _ in running.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, reader in running.values():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                reader.join(timeout=5)
                if not reader.is_alive():
                    proc.stdout.close()
            raise
        return [int(c) for c in codes]  # type: ignore[arg-type]

    def _start(self, job, threads: int | None) -> tuple[subprocess.Popen, threading.Thread]:
        env = dict(os.environ)
        env.update(job.env)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(list(job.argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
        reader = threading.Thread(target=self._echo, args=(job, proc), daemon=True)
        reader.start()
        return proc, reader

    def _echo(self, job, proc: subprocess.Popen) -> None:
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
