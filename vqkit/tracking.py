"""MLflow tracking: the one module of vqkit that imports :mod:`mlflow`.

A :class:`Tracker` sends params, tags, metrics and artifacts of one training run to an
MLflow tracking store. Every operation goes through a queue:

* while the store answers, operations are sent at once;
* when it does not (server down, network gone), training continues: the failure is
  reported **once** on stderr, and the queued operations are written to
  ``<run dir>/tracking_buffer.jsonl``. Sending is retried every :attr:`Tracker.retry_s`
  seconds and when the run ends; whatever is still unsent stays in that file and can be
  sent later with ``vqkit sync RUN_DIR`` (a resumed run sends it too). Nothing is lost.

The tracking URI is, in order: the recipe's ``tracking.uri``, ``$MLFLOW_TRACKING_URI``,
``sqlite:///<absolute path of ./mlflow.db>``.

Each run has a local folder (the *run dir*, ``<tracking.output_dir>/<run id>``) holding
``run.json`` (run id, tracking URI, experiment), checkpoints, images and the buffer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

__all__ = ["Tracker", "resolve_tracking_uri", "read_run_info", "find_run_dir", "RUN_INFO", "BUFFER"]

RUN_INFO = "run.json"
BUFFER = "tracking_buffer.jsonl"

#: MLflow limits (mlflow.utils.validation), repeated here so they hold for old clients too.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

#: MLflow error codes that mean "the store answered and refused", not "unreachable".
_REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def resolve_tracking_uri(recipe_uri: str | None) -> str:
    """Recipe ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``.

    A relative sqlite path is made absolute (relative to the working directory), so the
    URI recorded in checkpoints and ``run.json`` stays valid from any directory.
    """
    uri = recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:" and not Path(rel).is_absolute():
            return f"sqlite:///{(Path.cwd() / rel).resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


def _quiet_mlflow_logs() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _configure_http_retries() -> None:
    """Fail fast on an unreachable server: the tracker retries by itself later."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of a run dir (``{}`` when absent)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def find_run_dir(run_id: str, roots: Iterable[str | os.PathLike]) -> Path | None:
    """The local run dir of MLflow run ``run_id`` under any of ``roots`` (or ``None``)."""
    for root in roots:
        root = Path(root)
        direct = root / run_id
        if read_run_info(direct).get("run_id") == run_id:
            return direct
        if root.is_dir():
            for info in root.glob(f"*/{RUN_INFO}"):
                data = read_run_info(info.parent)
                if run_id in (data.get("run_id"), data.get("local_id")):
                    return info.parent
    return None


class _Unreachable(Exception):
    """The tracking store could not be reached."""


class Tracker:
    """Logs one run to MLflow through a queue that survives an unreachable store.

    Only the process that logs (rank 0) creates an enabled tracker; a disabled tracker
    accepts every call and does nothing.
    """

    #: seconds between two attempts to reach an unreachable store
    retry_s: float = 30.0

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        *,
        enabled: bool = True,
        stderr: TextIO | None = None,
    ):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = enabled
        self.stderr = stderr or sys.stderr
        self.run_id: str | None = None
        self.local_id = uuid.uuid4().hex[:12]
        self.run_dir: Path | None = None
        self.online = True
        self._client: Any = None
        self._queue: list[dict[str, Any]] = []
        self._persisted = 0  # how many queue entries are already in the buffer file
        self._warned = False
        self._next_try = 0.0
        self._resumed = False
        self._known_params: dict[str, str] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, resume_run_id: str | None = None) -> str | None:
        """Create (or reopen ``resume_run_id``) the MLflow run; returns its id, or ``None``
        when the store is unreachable (the run is then created when it comes back)."""
        if not self.enabled:
            return None
        self.run_id = resume_run_id
        self._resumed = resume_run_id is not None
        self._queue.append({"op": "start"})
        self._drain()
        return self.run_id

    def attach(self, run_dir: str | os.PathLike) -> Path:
        """Use ``run_dir`` for ``run.json`` and the buffer; queue anything buffered there by
        an earlier process (sent with the next operations)."""
        self.run_dir = Path(run_dir)
        if not self.enabled:
            return self.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        old = self._read_buffer()
        if old:
            # operations of an earlier leg go first, after this run's start
            head = [op for op in self._queue if op["op"] == "start"]
            rest = [op for op in self._queue if op["op"] != "start"]
            self._queue = head + [op for op in old if op["op"] != "start"] + rest
            self._persisted = 0
            self._persist()
        elif self._queue:
            self._persist()
        self._write_run_info()
        self._drain()
        return self.run_dir

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) and send everything queued.
        Returns True when nothing is left unsent."""
        if not self.enabled:
            return True
        self._queue.append({"op": "end", "status": status})
        self._persist_if_offline()
        self._drain(force=True)
        if self._queue:
            print(
                f"vqkit: warning: MLflow tracking at {self.uri} is still unreachable; "
                f"{len(self._queue)} operations are kept in {self.buffer_path}; send them "
                f"later with: vqkit sync {self.run_dir}",
                file=self.stderr,
            )
            return False
        if self.buffer_path is not None and self.buffer_path.exists():
            self.buffer_path.unlink()
        return True

    # ------------------------------------------------------------------ logging API
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, truncated to MLflow's limit). On a resumed run,
        keys already logged keep their value; changed values are recorded as tags
        ``vqkit.changed.<key>``."""
        if self.enabled and params:
            self._push({"op": "params", "params": {k: _param_value(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            self._push({"op": "tags", "tags": {k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (non-finite values are logged as they are)."""
        if not self.enabled or not metrics:
            return
        values = {k: _metric_value(v) for k, v in metrics.items()}
        self._push({"op": "metrics", "step": int(step), "ts": int(time.time() * 1000), "metrics": values})

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file (kept on disk until sent) under ``artifact_path``."""
        if self.enabled:
            self._push({"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def flush(self) -> bool:
        """Try to send everything queued now; True when nothing is left."""
        if self.enabled:
            self._drain(force=True)
        return not self._queue

    @property
    def buffer_path(self) -> Path | None:
        return self.run_dir / BUFFER if self.run_dir is not None else None

    @property
    def pending(self) -> int:
        """Operations not yet sent."""
        return len(self._queue)

    def describe(self) -> str:
        """Where the run is, for humans."""
        if self.run_id is None:
            return f"MLflow run not created yet (tracking store {self.uri} unreachable)"
        return f"MLflow run {self.run_id} in experiment {self.experiment!r} at {self.uri}"

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, *, stderr: TextIO | None = None) -> "Tracker":
        """A tracker for an existing run dir (``vqkit sync``): reopens its run if it has one."""
        info = read_run_info(run_dir)
        if not info:
            from vqkit.errors import VqkitError

            raise VqkitError(f"{run_dir} is not a vqkit run dir (no {RUN_INFO})")
        tracker = cls(info["tracking_uri"], info["experiment"], info.get("run_name"), stderr=stderr)
        tracker.local_id = info.get("local_id", tracker.local_id)
        tracker.run_id = info.get("run_id")
        tracker._resumed = tracker.run_id is not None
        tracker._queue.append({"op": "start"})
        tracker.attach(run_dir)
        return tracker

    # ------------------------------------------------------------------ internals
    def _push(self, op: dict[str, Any]) -> None:
        self._queue.append(op)
        self._persist_if_offline()
        self._drain()

    def _persist_if_offline(self) -> None:
        if not self.online:
            self._persist()

    def _persist(self) -> None:
        """Append the not-yet-persisted tail of the queue to the buffer file."""
        if self.buffer_path is None:
            return
        new = self._queue[self._persisted:]
        if not new:
            return
        with open(self.buffer_path, "a", encoding="utf-8") as f:
            for op in new:
                f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._persisted = len(self._queue)

    def _rewrite_buffer(self) -> None:
        if self.buffer_path is None:
            return
        if not self._queue:
            self.buffer_path.unlink(missing_ok=True)
            self._persisted = 0
            return
        tmp = self.buffer_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for op in self._queue:
                f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.buffer_path)
        self._persisted = len(self._queue)

    def _read_buffer(self) -> list[dict[str, Any]]:
        path = self.buffer_path
        if path is None or not path.is_file():
            return []
        ops = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                ops.append(json.loads(line))
            except ValueError:  # a line cut by a crash: the rest is still good
                continue
        return ops

    def _write_run_info(self) -> None:
        if self.run_dir is None or not self.enabled:
            return
        info = {
            "run_id": self.run_id,
            "local_id": self.local_id,
            "tracking_uri": self.uri,
            "experiment": self.experiment,
            "run_name": self.run_name,
        }
        tmp = self.run_dir / (RUN_INFO + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.run_dir / RUN_INFO)

    def _drain(self, force: bool = False) -> None:
        """Send queued operations in order until done or the store fails."""
        if not self._queue:
            return
        if not self.online and not force and time.monotonic() < self._next_try:
            return
        sent_any = False
        was_offline = not self.online
        try:
            while self._queue:
                n = self._send_head()
                del self._queue[:n]
                self._persisted = max(0, self._persisted - n)
                sent_any = True
        except _Unreachable as exc:
            if self.online:
                self.online = False
                if not self._warned:
                    self._warned = True
                    where = f"; operations are buffered in {self.buffer_path}" if self.buffer_path else ""
                    print(
                        f"vqkit: warning: MLflow tracking at {self.uri} is unreachable ({exc}); "
                        f"training continues{where} and they are sent when it is back",
                        file=self.stderr,
                    )
            self._next_try = time.monotonic() + self.retry_s
            self._rewrite_buffer()
            return
        self.online = True
        if was_offline and sent_any:
            print(f"vqkit: MLflow tracking at {self.uri} is reachable again; buffered operations sent",
                  file=self.stderr)
        if self.buffer_path is not None and self.buffer_path.exists():
            self._rewrite_buffer()

    def _client_or_raise(self) -> Any:
        if self._client is None:
            try:
                _configure_http_retries()
                from mlflow import MlflowClient

                _quiet_mlflow_logs()

                path = _sqlite_path(self.uri)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                self._client = MlflowClient(tracking_uri=self.uri)
            except Exception as exc:  # an unusable URI behaves like an unreachable store
                raise _Unreachable(_short(exc)) from None
        return self._client

    def _send_head(self) -> int:
        """Send the operation(s) at the head of the queue; return how many were done."""
        op = self._queue[0]
        try:
            client = self._client_or_raise()
            kind = op["op"]
            if kind == "start":
                self._do_start(client)
                return 1
            if self.run_id is None:  # pragma: no cover - start always precedes
                raise _Unreachable("run not created")
            if kind == "metrics":
                return self._do_metrics(client)
            if kind == "params":
                self._do_params(client, op["params"])
            elif kind == "tags":
                self._log_batch(client, tags=op["tags"])
            elif kind == "artifact":
                path = Path(op["path"])
                if path.is_file():
                    client.log_artifact(self.run_id, str(path), op.get("artifact_path"))
                else:
                    print(f"vqkit: warning: artifact {path} no longer exists; not logged", file=self.stderr)
            elif kind == "end":
                client.set_terminated(self.run_id, status=op.get("status", "FINISHED"))
            return 1
        except _Unreachable:
            raise
        except Exception as exc:
            code = getattr(exc, "error_code", None)
            if code in _REJECTED:
                print(f"vqkit: warning: MLflow refused {op['op']!r}: {_short(exc)}; skipped", file=self.stderr)
                return 1
            raise _Unreachable(_short(exc)) from None

    def _do_start(self, client: Any) -> None:
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                print(f"vqkit: warning: MLflow run {self.run_id} does not exist at {self.uri}; "
                      "logging to a new run", file=self.stderr)
                self.run_id, self._resumed = None, False
            else:
                if run.info.status != "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
        if self.run_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                db = _sqlite_path(self.uri)
                if db is not None:  # artifacts next to the database, not in the CWD
                    location = (db.resolve().parent / "mlruns").as_uri()
                exp_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
            run = client.create_run(exp_id, run_name=self.run_name)
            self.run_id = run.info.run_id
        self._write_run_info()

    def _do_params(self, client: Any, params: dict[str, str]) -> None:
        if self._resumed and self._known_params is None:
            self._known_params = dict(client.get_run(self.run_id).data.params)
        known = self._known_params or {}
        new = {k: v for k, v in params.items() if k not in known}
        changed = {f"vqkit.changed.{k}": v for k, v in params.items() if k in known and known[k] != v}
        items = list(new.items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._log_batch(client, params=dict(items[i:i + PARAMS_PER_BATCH]))
        if changed:
            self._log_batch(client, tags=changed)
        if self._known_params is not None:
            self._known_params.update(new)

    def _do_metrics(self, client: Any) -> int:
        """Send consecutive metric operations as batches of at most 1000 values."""
        from mlflow.entities import Metric

        batch: list[Any] = []
        n = 0
        for op in self._queue:
            if op["op"] != "metrics":
                break
            if batch and len(batch) + len(op["metrics"]) > METRICS_PER_BATCH:
                break
            for k, v in op["metrics"].items():
                batch.append(Metric(k, float(v), int(op["ts"]), int(op["step"])))
            n += 1
        client.log_batch(self.run_id, metrics=batch)
        return n

    def _log_batch(self, client: Any, params: Mapping[str, str] | None = None,
                   tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        ps = [Param(k, v) for k, v in (params or {}).items()]
        ts = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(ts), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, tags=ts[i:i + PARAMS_PER_BATCH])
        if ps:
            client.log_batch(self.run_id, params=ps)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 3] + "..."
    return text


def _metric_value(value: Any) -> float:
    v = float(value)
    return v if math.isfinite(v) else (float("nan") if math.isnan(v) else v)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


# =========================================================================== reading runs back
def _client(uri: str) -> Any:
    _configure_http_retries()
    from mlflow import MlflowClient

    _quiet_mlflow_logs()
    return MlflowClient(tracking_uri=uri)


def download_checkpoint(uri: str, run_id: str, run_dir: str | os.PathLike) -> Path:
    """Download the newest checkpoint artifact of MLflow run ``run_id`` into
    ``run_dir/checkpoints/`` and return its path.

    Raises :class:`~vqkit.errors.VqkitError` when the run or its checkpoint is missing or
    the store cannot be reached.
    """
    from vqkit.errors import VqkitError

    try:
        client = _client(uri)
        run = client.get_run(run_id)
    except Exception as exc:
        raise VqkitError(
            f"{run_id!r} is neither a checkpoint file, a run dir, nor an MLflow run at {uri} "
            f"({_short(exc)})"
        ) from None
    candidates = []
    tag = run.data.tags.get("vqkit.last_checkpoint")
    if tag:
        try:
            candidates.append(json.loads(tag)["artifact"])
        except (ValueError, KeyError, TypeError):
            pass
    candidates += [c for c in ("checkpoints/final.pt", "checkpoints/last.pt") if c not in candidates]
    errors = []
    for artifact in candidates:
        try:
            local = client.download_artifacts(run_id, artifact, dst_path=str(run_dir))
            return Path(local)
        except Exception as exc:  # try the next candidate
            errors.append(f"{artifact}: {_short(exc)}")
    raise VqkitError(f"MLflow run {run_id} at {uri} has no checkpoint artifact ({'; '.join(errors)})")


def fetch_runs(uri: str, run_ids: Iterable[str] = (), experiment: str | None = None) -> list[dict[str, Any]]:
    """Runs as plain dicts ``{run_id, run_name, status, params, metrics, tags}`` (metrics:
    latest value of each key), by id or all runs of ``experiment`` (newest first)."""
    from vqkit.errors import VqkitError

    try:
        client = _client(uri)
        runs = []
        if experiment is not None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = [e.name for e in client.search_experiments()]
                from vqkit.errors import suggest

                raise VqkitError(f"no MLflow experiment {experiment!r} at {uri}" + suggest(experiment, names))
            runs = list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]))
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except Exception as exc:
                raise VqkitError(f"no MLflow run {rid!r} at {uri} ({_short(exc)})") from None
    except VqkitError:
        raise
    except Exception as exc:
        raise VqkitError(f"cannot read MLflow tracking store {uri}: {_short(exc)}") from None
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
        }
        for r in runs
    ]
