"""MLflow tracking: the one module of vqkit that imports :mod:`mlflow`.

A :class:`Tracker` sends params, tags, metrics and artifacts of one training run to an
MLflow tracking store. Every operation goes through a queue:

* while the store answers, operations are sent at once;
* when it does not (server down, network gone), training continues: the failure is
  reported **once** on stderr, and the queued operations are written to
  ``<run dir>/tracking_buffer.jsonl``. Sending is retried every :attr:`Tracker.retry_s`
  seconds and when the run ends; whatever is still unsent stays in that file and can be
  sent later with ``vqkit sync RUN_DIR`` (a resumed run sends it too). Nothing is lost.
  A request to a server that accepts but never answers gives up after
  :data:`REQUEST_TIMEOUT_S` seconds (artifacts: longer, by size), so a hung server costs
  at most that per retry interval.

The buffer is a journal: every operation has a sequence number, and after each operation
is sent the number is recorded in ``tracking_buffer.sent`` (atomically; a mark without a
buffer file is stale and removed), so a process killed while sending resends at most the
one operation in flight, and those are idempotent (metrics by ``(key, step)``, params,
tags and artifacts by name, the end status). Creating a run is idempotent too:
the run carries the tag ``vqkit.local_id`` and is looked up by it before a new one is made.
On a resumed run, no metric ``(key, step)`` already in the store is logged again, and
metrics an earlier leg buffered for steps after the resumed checkpoint are dropped (the
resumed leg logs those steps itself); an earlier leg's queued ``end`` is not replayed.

The embedded sqlite store is created and migrated under an inter-process file lock
(``<db>.lock``, the ``filelock`` package), so runs started at the same moment on a new
store do not race on MLflow's migrations. A sqlite store that cannot be opened is a user
error naming the file and MLflow's error, never "unreachable".

The tracking URI is, in order: the recipe's ``tracking.uri``, ``$MLFLOW_TRACKING_URI``,
``sqlite:///<absolute path of ./mlflow.db>``.

Each run has a local folder (the *run dir*, ``<tracking.output_dir>/<run id>``, or
``<tracking.output_dir>/local-<local id>`` when the store was unreachable as the run
started: ``run.json`` then gets the run id once the run is created) holding
``run.json`` (run id, tracking URI, experiment), ``recipe.yaml``, ``checkpoints/``, the
named PNG grids in ``grids/`` (:data:`GRIDS_DIR`: ``recon_<step>.png``, ``samples_<step>.png``,
logged as artifacts of that folder), the PNGs sent with ``log_image`` in ``images/`` (the
UI's image chart: ``reconstructions_<step>.png``), ``plots/`` and the buffer.
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
SENT = "tracking_buffer.sent"
#: seconds an HTTP request to the tracking server may take (unless
#: ``$MLFLOW_HTTP_REQUEST_TIMEOUT`` is set); artifact uploads get this plus 1 s per 20 MB
REQUEST_TIMEOUT_S = 5.0

#: Experiment tag of MLflow 3 (``ExperimentKind``): ``custom_model_development`` marks a
#: model-training experiment; set when vqkit creates (or first logs to) an experiment. MLflow
#: 3.17's UI does not read it to pick the experiment page's view: its workflow navigation
#: (compiled in as on) takes the "GenAI / Model training" switch instead, i.e. the URL
#: parameter ``workflowType``, else the browser's local storage ``mlflow.workflowType_v1``
#: (default ``"genai"``); no store-side value exists. :func:`ui_url` therefore adds
#: ``workflowType=machine_learning``.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow's artifact folder of ``log_image`` files. Its UI parses every file name directly in
#: it as ``<key>+step+<n>+timestamp+<t>+<uuid>[+compressed].<ext>``; any other file there
#: (vqkit's ``images/recon_<step>.png`` until now) makes the parse fail for the whole run, and
#: the image grid then shows "No logged images" for it. Named PNG grids go to :data:`GRIDS_DIR`.
MLFLOW_IMAGES_DIR = "images"
#: Artifact folder of the named PNG grids (``recon_<step>.png``, ``samples_<step>.png``).
GRIDS_DIR = "grids"
#: The run description shown by MLflow's UI.
DESCRIPTION_TAG = "mlflow.note.content"

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


_USER_TIMEOUT: str | None = None


def _configure_http_retries() -> None:
    """Fail fast on an unreachable or hung server: the tracker retries by itself later
    (one attempt per request, :data:`REQUEST_TIMEOUT_S` seconds at most)."""
    global _USER_TIMEOUT
    if _USER_TIMEOUT is None:
        _USER_TIMEOUT = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(REQUEST_TIMEOUT_S)))


class _request_timeout:
    """Within the block, HTTP requests time out after ``seconds`` (unless the user set
    ``$MLFLOW_HTTP_REQUEST_TIMEOUT``: MLflow reads it at each request)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> None:
        self.saved = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
        if not _USER_TIMEOUT:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(math.ceil(self.seconds))))

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = self.saved


class NoStore(Exception):
    """A read-only lookup found no tracking store at a local URI (nothing was created)."""

    def __init__(self, uri: str, where: Path):
        self.uri, self.where = uri, where
        super().__init__(f"no MLflow tracking store at {uri} ({where} does not exist: nothing has been "
                         "logged there; give --tracking-uri or set MLFLOW_TRACKING_URI)")


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local store (sqlite database, file store), else ``None``."""
    path = _sqlite_path(uri)
    if path is not None:
        return path
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" not in uri and uri not in ("", "databricks") and not uri.startswith(("databricks", "uc:")):
        return Path(uri)
    return None


def _file_store_allowed() -> bool:
    """Whether the installed MLflow opens file stores: MLflow 3.17 refuses them ("maintenance
    mode") unless its own opt-in ``MLFLOW_ALLOW_FILE_STORE`` is true; releases without that
    setting open them."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:
        return True
    return bool(MLFLOW_ALLOW_FILE_STORE.get())


def _holds_runs(folder: Path) -> bool:
    """Whether ``folder`` looks like a file store with something in it (experiment folders
    ``0/``, ``123.../``, or its ``.trash/``): what ``mlflow migrate-filestore`` can copy."""
    try:
        return any(d.is_dir() and (d.name.isdigit() or d.name == ".trash") for d in folder.iterdir())
    except OSError:
        return False


def file_store_problem(uri: str, ui: bool = False) -> str | None:
    """The user error for ``uri`` when it names an MLflow file store (a plain path or a
    ``file:`` URI) that the installed MLflow will not open (see :func:`_file_store_allowed`),
    else ``None``. It names the sqlite store to use instead and, for a folder holding runs,
    MLflow's own ``mlflow migrate-filestore`` command that copies them into one (to
    ``mlflow.db`` next to the folder, or ``<folder name>.db`` when that exists); ``ui``: the
    wording of ``vqkit ui`` (``mlflow server`` exits at start on such a store). A sqlite
    database or another file given as a plain path is named for what it is (MLflow would
    read it as a folder)."""
    import shlex

    if _sqlite_path(uri) is not None:
        return None
    path = _local_store(uri)
    if path is None:
        return None
    path = path.resolve()
    if path.is_file():
        try:
            with open(path, "rb") as f:
                sqlite = f.read(16) == b"SQLite format 3\x00"
        except OSError:
            sqlite = False
        if sqlite:
            return (f"{uri} is a sqlite database given as a plain path, which MLflow reads as a file store "
                    f"(a folder): give sqlite:///{path}")
        return (f"{uri} is a file, not an MLflow tracking store (MLflow reads a plain path as a file-store "
                "folder): give a store's URI, e.g. sqlite:///PATH/mlflow.db")
    if _file_store_allowed():
        return None
    what = "an MLflow file store (a folder)" if path.is_dir() else "an MLflow file-store path (nothing is there)"
    verb = "MLflow 3's UI does not serve (`mlflow server` exits at start on one)" if ui else \
        "MLflow 3 no longer opens"
    head = f"{uri} is {what}, which {verb}"
    instead = f"sqlite:///{path.parent / 'mlflow.db'}"
    if not path.is_dir():
        return f"{head}: use a sqlite store, e.g. {instead}"
    if not _holds_runs(path):
        return f"{head}: use a sqlite store, e.g. {instead}"
    db = path.parent / "mlflow.db"
    if db.exists():
        db = path.parent / f"{path.name}.db"
    target = f"sqlite:///{db}"
    then = f"`vqkit ui --tracking-uri {shlex.quote(target)}`" if ui else f"use {target}"
    return (f"{head}: copy its runs into a sqlite store with `mlflow migrate-filestore --source "
            f"{shlex.quote(str(path))} --target {shlex.quote(target)}`, then {then} (or set "
            "MLFLOW_ALLOW_FILE_STORE=true to keep using the folder)")


def _store_missing(uri: str) -> Path | None:
    """The path of a local store that does not exist (an empty sqlite file counts as
    missing: MLflow would create its tables in it), else ``None``."""
    path = _local_store(uri)
    if path is None:
        return None
    if _sqlite_path(uri) is not None:
        return None if path.is_file() and path.stat().st_size > 0 else path
    return None if path.is_dir() else path


def _open_client(uri: str, create: bool = True) -> Any:
    """An :class:`mlflow.MlflowClient` whose store is open.

    A sqlite store is created and migrated under an inter-process lock (``<db>.lock``):
    MLflow's migrations are not safe to run from two processes at once. A sqlite store
    that exists but cannot be opened (half-migrated, not a database, unreadable), or that
    cannot be created, raises :class:`~vqkit.errors.VqkitError` naming the file and
    MLflow's error. Other stores are contacted on first use.

    ``create=False`` (every read-only lookup: ``vqkit compare``, ``eval``, ``sample``,
    ``ui``): a local store (sqlite file, file-store folder) that does not exist raises
    :class:`NoStore` and nothing is created, not even the lock file.

    A file store that MLflow will not open is a :class:`~vqkit.errors.VqkitError` saying
    what to use instead (:func:`file_store_problem`), never "unreachable".
    """
    problem = file_store_problem(uri)
    if problem is not None:
        from vqkit.errors import VqkitError

        raise VqkitError(problem)
    _configure_http_retries()
    if not create:
        missing = _store_missing(uri)
        if missing is not None:
            raise NoStore(uri, missing)
    from mlflow import MlflowClient

    _quiet_mlflow_logs()
    path = _sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock, Timeout

    from vqkit.errors import VqkitError

    existed = path.is_file() and path.stat().st_size > 0
    lock = FileLock(str(path) + ".lock", timeout=300)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise VqkitError(f"MLflow tracking store {path}: another process holds {path}.lock for "
                         "more than 300 s (a store migration that hangs?)") from None
    except OSError as exc:
        if not existed:
            raise VqkitError(f"cannot create the MLflow tracking store {path}: {exc.strerror or exc}") from None
        lock = None  # an existing store in a read-only folder: reading needs no migration
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: creates / migrates it
    except Exception as exc:
        if "database is locked" in str(exc):  # busy, not broken: retried later
            raise
        if existed:
            raise VqkitError(f"the MLflow tracking store {path} exists but cannot be opened: "
                             f"{type(exc).__name__}: {_short(exc)}") from None
        raise VqkitError(f"cannot create the MLflow tracking store {path}: "
                         f"{type(exc).__name__}: {_short(exc)}") from None
    finally:
        if lock is not None:
            lock.release()
    return client


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
        self._seq = 0  # sequence number of the last queued operation
        self._after_step: int | None = None  # resumed at this step (earlier leg's later steps dropped)
        self._existing: dict[str, set[int]] = {}  # metric key -> steps already in the store
        self._training = True  # wording of the warnings (False for `vqkit sync`)
        #: status of a reopened run before this leg set it RUNNING (None: a new run)
        self.reopened_from: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, resume_run_id: str | None = None, after_step: int | None = None) -> str | None:
        """Create (or reopen ``resume_run_id``) the MLflow run; returns its id, or ``None``
        when the store is unreachable (the run is then created when it comes back).

        ``after_step``: this leg resumes from a checkpoint of that step; metrics an earlier
        leg buffered for later steps are dropped (this leg logs them) and no metric step
        already in the store is logged again."""
        if not self.enabled:
            return None
        self.run_id = resume_run_id
        self._resumed = resume_run_id is not None
        self._after_step = after_step
        self._queue.append(self._numbered({"op": "start"}))
        self._drain()
        return self.run_id

    def attach(self, run_dir: str | os.PathLike, *, replay_end: bool = False) -> Path:
        """Use ``run_dir`` for ``run.json`` and the buffer; queue anything buffered there by
        an earlier process (sent with the next operations) and not yet sent.

        An earlier leg's ``end`` is replayed only with ``replay_end`` (``vqkit sync``): a
        resumed run is running. Its metrics (and images) of steps after ``after_step`` of
        :meth:`start` are dropped: the resumed leg logs those steps."""
        self.run_dir = Path(run_dir)
        if not self.enabled:
            return self.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        old = self._read_buffer()
        had_old = bool(old)
        if old:
            after = self._after_step
            old = [op for op in old if op["op"] != "start" and (replay_end or op["op"] != "end")
                   and not (after is not None and "step" in op and int(op["step"]) > after)]
            # operations of an earlier leg go first, after this run's start
            head = [op for op in self._queue if op["op"] == "start"]
            rest = [op for op in self._queue if op["op"] != "start"]
            self._seq = max([self._seq] + [int(op.get("seq", 0)) for op in old])
            for op in rest:  # numbered after the earlier leg's operations
                op["seq"] = self._next_seq()
            self._queue = head + old + rest
            self._rewrite_buffer()
        else:
            if self.buffer_path.exists():  # everything in it was sent: a new journal
                self.buffer_path.unlink()
                self._sent_path.unlink(missing_ok=True)
        if not had_old and self._queue:
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
        ``vqkit.changed.<key>``. An empty mapping (``reset.params`` of ``reset: {name:
        none}``, any component without params) is not a param: it is left out, so MLflow's
        views do not show a ``{}`` column beside the runs that log ``<block>.params.<name>``."""
        params = {k: v for k, v in params.items() if not (isinstance(v, Mapping) and not v)}
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

    def log_image(self, local_path: str | os.PathLike, key: str, step: int) -> None:
        """Log a PNG (kept on disk until sent) with ``mlflow``'s ``log_image(key=, step=)``,
        so the UI's image grid and its step slider compare runs."""
        if self.enabled:
            self._push({"op": "image", "path": str(Path(local_path).resolve()), "key": key,
                        "step": int(step), "ts": int(time.time() * 1000)})

    def log_image_grid(self, local_path: str | os.PathLike, key: str, step: int) -> None:
        """A PNG grid both as MLflow image ``key`` at ``step`` (``images/``: the UI's image grid
        and step slider) and as the named artifact ``grids/<file name>``, never a file of its
        own in ``images/`` (see :data:`MLFLOW_IMAGES_DIR`)."""
        self.log_artifact(local_path, GRIDS_DIR)
        self.log_image(local_path, key, step)

    def log_dataset(self, name: str, digest: str, source: Mapping[str, Any], context: str,
                    profile: Mapping[str, Any] | None = None) -> None:
        """Record a data set the run used as an MLflow input (``mlflow.log_input``):
        ``context`` is the split (``train``/``test``), shown by the UI's Dataset column."""
        if self.enabled:
            self._push({"op": "dataset", "name": name, "digest": digest, "source": dict(source),
                        "context": context, "profile": dict(profile or {})})

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
        tracker._training = False
        tracker._queue.append(tracker._numbered({"op": "start"}))
        tracker.attach(run_dir, replay_end=True)
        return tracker

    # ------------------------------------------------------------------ internals
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _numbered(self, op: dict[str, Any]) -> dict[str, Any]:
        op["seq"] = self._next_seq()
        return op

    def _push(self, op: dict[str, Any]) -> None:
        self._queue.append(self._numbered(op))
        self._persist_if_offline()
        self._drain()

    @property
    def _sent_path(self) -> Path | None:
        return self.run_dir / SENT if self.run_dir is not None else None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a buffer rewrite cut by a crash."""
        if self.run_dir is not None:
            for name in (BUFFER, SENT, RUN_INFO):
                for tmp in self.run_dir.glob(f"{name.rsplit('.', 1)[0]}*.tmp"):
                    tmp.unlink(missing_ok=True)

    def _record_sent(self, seq: int) -> None:
        """Durably note that the journal's operations up to ``seq`` are sent."""
        path = self._sent_path
        if path is None or not (self.buffer_path and self.buffer_path.exists()):
            return
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"seq": int(seq)}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self._buffer_failed(exc)

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
        size = 0
        try:
            if not self.buffer_path.exists() and self._sent_path is not None:
                self._sent_path.unlink(missing_ok=True)  # the mark of an earlier, fully sent journal
            size = self.buffer_path.stat().st_size if self.buffer_path.exists() else 0
            with open(self.buffer_path, "a", encoding="utf-8") as f:
                for op in new:
                    f.write(json.dumps(op) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # full disk, read-only: keep them in memory, say so once
            try:
                os.truncate(self.buffer_path, size)  # no half-written tail to be read twice
            except OSError:
                pass
            self._buffer_failed(exc)
            return
        self._persisted = len(self._queue)

    def _buffer_failed(self, exc: OSError) -> None:
        if not getattr(self, "_warned_buffer", False):
            self._warned_buffer = True
            path = exc.filename or self.buffer_path
            print(f"vqkit: warning: cannot write {path}: {exc.strerror or exc}; unsent tracking "
                  "operations are kept in memory only", file=self.stderr)

    def _rewrite_buffer(self) -> None:
        if self.buffer_path is None:
            return
        if not self._queue:
            self.buffer_path.unlink(missing_ok=True)
            self._sent_path.unlink(missing_ok=True)
            self._persisted = 0
            return
        tmp = self.buffer_path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for op in self._queue:
                    f.write(json.dumps(op) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.buffer_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._buffer_failed(exc)
            return
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
        sent = 0
        try:
            sent = int(json.loads(self._sent_path.read_text(encoding="utf-8"))["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return [op for op in ops if int(op.get("seq", sent + 1)) > sent]

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
                persisted = n <= self._persisted
                last_seq = self._queue[n - 1].get("seq")
                del self._queue[:n]
                self._persisted = max(0, self._persisted - n)
                if persisted and last_seq is not None:
                    self._record_sent(int(last_seq))
                sent_any = True
        except _Unreachable as exc:
            if self.online:
                self.online = False
                if not self._warned:
                    self._warned = True
                    where = f"operations are buffered in {self.buffer_path}" if self.buffer_path else \
                        "operations are kept in memory"
                    goes_on = "training continues; " if self._training else ""
                    print(
                        f"vqkit: warning: MLflow tracking at {self.uri} is unreachable ({exc}); "
                        f"{goes_on}{where} and sent when it is back",
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
            from vqkit.errors import VqkitError

            try:
                self._client = _open_client(self.uri)
            except VqkitError:  # a sqlite store that cannot be opened: the user must act
                raise
            except Exception as exc:  # an unusable URI behaves like an unreachable store
                raise _Unreachable(_short(exc)) from None
        return self._client

    def _send_head(self) -> int:
        """Send the operation(s) at the head of the queue; return how many were done."""
        from vqkit.errors import VqkitError

        op = self._queue[0]
        try:
            client = self._client_or_raise()
            kind = op["op"]
            if kind == "artifact" and Path(op["path"]).is_file():
                seconds = REQUEST_TIMEOUT_S + Path(op["path"]).stat().st_size / 20e6
            else:
                seconds = REQUEST_TIMEOUT_S
            with _request_timeout(seconds):
                return self._send_op(client, op, kind)
        except (_Unreachable, VqkitError):
            raise
        except Exception as exc:
            code = getattr(exc, "error_code", None)
            if code in _REJECTED and op["op"] == "start":  # without a run nothing else can be sent: not skippable
                raise VqkitError(f"MLflow at {self.uri} refused to create the run: {_short(exc)}") from None
            if code in _REJECTED:
                print(f"vqkit: warning: MLflow refused {op['op']!r}: {_short(exc)}; skipped", file=self.stderr)
                return 1
            raise _Unreachable(_short(exc)) from None

    def _send_op(self, client: Any, op: dict[str, Any], kind: str) -> int:
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
        elif kind == "image":
            self._do_image(client, op)
        elif kind == "dataset":
            self._do_dataset(client, op)
        elif kind == "end":
            client.set_terminated(self.run_id, status=op.get("status", "FINISHED"))
        return 1

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
                self.reopened_from = run.info.status  # restored if this leg fails before it trains
                if run.info.status != "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
                self._existing = self._logged_steps(client, run)
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
            if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            run = self._find_own_run(client, exp_id)  # created by a send cut short?
            if run is None:
                run = client.create_run(exp_id, run_name=self.run_name, tags={"vqkit.local_id": self.local_id})
            self.run_id = run.info.run_id
        try:
            self._write_run_info()
        except OSError as exc:  # a local file, not the store: reported where the run dir is used
            self._buffer_failed(exc)

    def _do_image(self, client: Any, op: dict[str, Any]) -> None:
        path = Path(op["path"])
        if not path.is_file():
            print(f"vqkit: warning: image {path} no longer exists; not logged", file=self.stderr)
            return
        from PIL import Image

        with Image.open(path) as image:
            client.log_image(self.run_id, image.convert("RGB"), key=op["key"], step=op["step"],
                             timestamp=op["ts"], synchronous=True)

    def _do_dataset(self, client: Any, op: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=op["name"], digest=op["digest"], source_type="vqkit",
                          source=json.dumps(op["source"], sort_keys=True),
                          profile=json.dumps(op["profile"], sort_keys=True) if op["profile"] else None)
        tags = [InputTag(key="mlflow.data.context", value=op["context"])]
        client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])

    def _find_own_run(self, client: Any, exp_id: str) -> Any:
        """The run this tracker created before a crash cut the send short (same local id)."""
        runs = client.search_runs([exp_id], filter_string=f"tags.`vqkit.local_id` = '{self.local_id}'",
                                  max_results=1)
        return runs[0] if runs else None

    @staticmethod
    def _logged_steps(client: Any, run: Any) -> dict[str, set[int]]:
        """Steps of every metric already in the store for ``run``."""
        return {key: {int(m.step) for m in client.get_metric_history(run.info.run_id, key)}
                for key in run.data.metrics}

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
                if int(op["step"]) in self._existing.get(k, ()):
                    continue  # logged by an earlier leg of this run: never twice
                batch.append(Metric(k, float(v), int(op["ts"]), int(op["step"])))
            n += 1
        if batch:
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
    """A client of an existing store, for reading (and logging into existing runs): a local
    store that does not exist is a :class:`~vqkit.errors.VqkitError` and is not created."""
    from vqkit.errors import VqkitError

    try:
        return _open_client(uri, create=False)
    except NoStore as exc:
        raise VqkitError(str(exc)) from None


def _reader(uri: str, experiment: str | None) -> Any:
    """:func:`_client`; a missing store, when an experiment is named, is reported as that
    experiment missing (``vqkit sweep`` then starts one)."""
    from vqkit.errors import VqkitError

    try:
        return _open_client(uri, create=False)
    except NoStore as exc:
        if experiment is None:
            raise VqkitError(str(exc)) from None
        raise VqkitError(f"no MLflow experiment {experiment!r} at {uri} (no tracking store there: "
                         f"{exc.where} does not exist)") from None


def run_status(uri: str, run_id: str) -> str | None:
    """The status of MLflow run ``run_id`` (``RUNNING``, ``FINISHED``, ...), or ``None``
    when the store cannot be reached or has no such run."""
    from vqkit.errors import VqkitError

    try:
        with _request_timeout(REQUEST_TIMEOUT_S):
            return _open_client(uri).get_run(run_id).info.status
    except VqkitError:
        raise
    except Exception:
        return None


def download_checkpoint(uri: str, run_id: str, run_dir: str | os.PathLike) -> Path:
    """Download the newest checkpoint artifact of MLflow run ``run_id`` into
    ``run_dir/checkpoints/`` and return its path.

    Raises :class:`~vqkit.errors.VqkitError` when the run or its checkpoint is missing or
    the store cannot be reached.
    """
    from vqkit.errors import VqkitError

    try:
        client = _open_client(uri, create=False)
        run = client.get_run(run_id)
    except NoStore as exc:
        raise VqkitError(f"{run_id!r} is neither a checkpoint file, a run dir, nor an MLflow run at {uri} "
                         f"(no tracking store there: {exc.where} does not exist)") from None
    except VqkitError:  # a store MLflow will not open: said as it is
        raise
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
        client = _reader(uri, experiment)
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


# =========================================================================== run context
def context_tags(source: str | None, entry_point: str) -> dict[str, str]:
    """MLflow's standard context tags of a run: ``mlflow.source.name`` (the recipe file, else
    the command), ``mlflow.source.type`` (``LOCAL``), ``mlflow.project.entryPoint`` (the
    vqkit command), ``mlflow.user`` and, when the recipe (else the working directory) is in
    a git checkout, ``mlflow.source.git.commit`` / ``branch`` / ``repoURL``."""
    import getpass

    from mlflow.utils import mlflow_tags as mt

    tags = {
        mt.MLFLOW_SOURCE_NAME: source or entry_point,
        mt.MLFLOW_SOURCE_TYPE: "LOCAL",
        mt.MLFLOW_PROJECT_ENTRY_POINT: entry_point,
    }
    try:
        tags[mt.MLFLOW_USER] = getpass.getuser()
    except Exception:  # no user name (containers without a passwd entry)
        pass
    where = Path(source).resolve().parent if source and Path(source).is_file() else Path.cwd()
    try:
        from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

        commit = get_git_commit(str(where))
        if commit:
            tags[mt.MLFLOW_GIT_COMMIT] = commit
            for key, fn in ((mt.MLFLOW_GIT_BRANCH, get_git_branch), (mt.MLFLOW_GIT_REPO_URL, get_git_repo_url)):
                value = fn(str(where))
                if value:
                    tags[key] = value
    except Exception:  # GitPython or the git executable missing: no git tags
        pass
    return tags


class SystemMetrics:
    """MLflow's system metrics monitor (CPU, memory, disk, network, GPU through psutil /
    pynvml) logging ``system/*`` metrics to a run every ``interval_s`` seconds from a thread
    (default: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, else 10).
    Does nothing when the run does not exist yet (store unreachable)."""

    def __init__(self, uri: str, run_id: str | None, interval_s: float | None = None):
        self._monitor = None
        if run_id is None:
            return
        if interval_s is None:  # MLflow's own setting, else its default of 10 s
            interval_s = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10.0)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
            self._monitor.start()
        except Exception as exc:  # psutil missing or the store refused: training goes on
            print(f"vqkit: warning: system metrics are off ({_short(exc)})", file=sys.stderr)
            self._monitor = None

    def finish(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
            self._monitor = None


# =========================================================================== finding runs
def _store_error(uri: str, exc: BaseException):
    from vqkit.errors import VqkitError

    if isinstance(exc, VqkitError):  # already says what is wrong with the store
        return exc
    return VqkitError(f"cannot read MLflow tracking store {uri}: {_short(exc)}")


def run_dict(run: Any) -> dict[str, Any]:
    """A run as a plain dict ``{run_id, run_name, status, experiment_id, start_time, params,
    metrics, tags}`` (metrics: the latest value of each key)."""
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "start_time": run.info.start_time,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


def search_runs(uri: str, experiment: str | None = None, filter_string: str = "",
                max_results: int = 5000) -> list[dict[str, Any]]:
    """Active runs of ``experiment`` (all experiments when ``None``), newest first, as
    :func:`run_dict` dicts; an unknown experiment is a user error with a suggestion."""
    from vqkit.errors import VqkitError, suggest

    try:
        client = _reader(uri, experiment)
        if experiment is not None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = [e.name for e in client.search_experiments()]
                raise VqkitError(f"no MLflow experiment {experiment!r} at {uri}" + suggest(experiment, names))
            ids = [exp.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        if not ids:
            return []
        runs = client.search_runs(ids, filter_string=filter_string, max_results=max_results,
                                  order_by=["attributes.start_time DESC"])
    except VqkitError:
        raise
    except Exception as exc:
        raise _store_error(uri, exc) from None
    return [run_dict(r) for r in runs]


def resolve_runs(uri: str, refs: Iterable[str], experiment: str | None = None) -> list[dict[str, Any]]:
    """The runs named by ``refs``: each a full run id, a unique run-id prefix or a run name
    (a run name matching several runs is an error listing them). Searched in
    ``experiment``, else in every experiment."""
    from vqkit.errors import Problem, VqkitError

    refs = list(refs)
    if not refs:
        return []
    pool = search_runs(uri, experiment)
    out, problems = [], []
    for ref in refs:
        hits = [r for r in pool if r["run_id"] == ref]
        if not hits:
            hits = [r for r in pool if r["run_id"].startswith(ref.lower())] if _hexish(ref) else []
        if not hits:
            hits = [r for r in pool if r["run_name"] == ref]
        if len(hits) == 1:
            out.append(hits[0])
        elif not hits:
            from vqkit.errors import suggest

            names = sorted({r["run_name"] for r in pool if r["run_name"]})
            where = f"experiment {experiment!r}" if experiment else "any experiment"
            hint = _id_hint(ref, pool) or (suggest(ref, names) if names else "")
            problems.append(Problem(f"no MLflow run with id, id prefix or name {ref!r} in {where} at {uri}" + hint))
        else:
            listed = ", ".join(f"{r['run_id'][:8]} ({r['run_name']}, {r['status']})" for r in hits[:8])
            problems.append(Problem(f"{ref!r} matches {len(hits)} runs: {listed}; give a longer run-id prefix"))
    if problems:
        raise VqkitError(problems)
    return out


def _hexish(text: str) -> bool:
    return len(text) >= 4 and all(c in "0123456789abcdefABCDEF" for c in text)


def _id_hint(ref: str, pool: list[dict[str, Any]]) -> str:
    """' (did you mean 'a1b2c3d4'? (run name))' when hex ``ref`` is one typo away from the
    start of a run id, else ''."""
    from vqkit.errors import closest

    if not _hexish(ref):
        return ""
    heads = {r["run_id"][:len(ref)]: r for r in pool}
    close = closest(ref.lower(), heads, cutoff=0.7)
    if close is None:
        return ""
    run = heads[close]
    return f" (did you mean {run['run_id'][:max(8, len(ref))]!r}? run {run['run_name']!r})"


#: a full MLflow run id (uuid4 hex)
_FULL_RUN_ID = 32


def resolve_run_id(uri: str, ref: str) -> str:
    """The full id of the one run that ``ref`` names in the store at ``uri``: a full run id,
    a unique run-id prefix (the 8-character ids that ``vqkit compare`` and sweep summaries
    print) or a run name, in any experiment. The one resolver of every command that takes a
    run (``vqkit eval``, ``train --resume``, ``sample``, ``prior train``'s
    ``autoencoder.run``; ``compare`` through :func:`resolve_runs`): an unknown reference is
    a user error with a did-you-mean, an ambiguous one lists the runs it matches. A full id
    is looked up directly (deleted runs too), without listing the store."""
    if len(ref) == _FULL_RUN_ID and _hexish(ref):
        from vqkit.errors import VqkitError

        try:
            return _client(uri).get_run(ref.lower()).info.run_id
        except VqkitError:
            raise
        except Exception:  # not in the store: the search below says so, with suggestions
            pass
    return resolve_runs(uri, [ref])[0]["run_id"]


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of metric ``key`` of a run, in step order."""
    try:
        history = _client(uri).get_metric_history(run_id, key)
    except Exception as exc:
        raise _store_error(uri, exc) from None
    return sorted((int(m.step), float(m.value)) for m in history)


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Paths of the files directly under artifact folder ``path`` of a run."""
    try:
        return [a.path for a in _client(uri).list_artifacts(run_id, path) if not a.is_dir]
    except Exception as exc:
        raise _store_error(uri, exc) from None


def download_artifact(uri: str, run_id: str, path: str, dst: str | os.PathLike) -> Path:
    """Download artifact ``path`` of a run into folder ``dst``; returns the local file."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(_client(uri).download_artifacts(run_id, path, dst_path=str(dst)))
    except Exception as exc:
        raise _store_error(uri, exc) from None


def delete_run(uri: str, run_id: str) -> None:
    """Soft-delete a run (MLflow's ``deleted`` lifecycle stage: hidden, restorable)."""
    try:
        _client(uri).delete_run(run_id)
    except Exception as exc:
        raise _store_error(uri, exc) from None


def experiments(uri: str) -> list[tuple[str, str]]:
    """``[(experiment id, name), ...]`` of the active experiments of a store."""
    try:
        return [(e.experiment_id, e.name) for e in _client(uri).search_experiments()]
    except Exception as exc:
        raise _store_error(uri, exc) from None


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The UI page of an experiment's runs (or of one run), in "Model training" mode."""
    path = "/#/experiments"
    if experiment_id is not None:
        path += f"/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}{path}?workflowType=machine_learning"


def ui_command(uri: str) -> str:
    """The command that shows the runs of tracking store ``uri`` in MLflow's UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {ui_url(uri)} in a browser"
    return f"vqkit ui --tracking-uri {uri}  (or: mlflow ui --backend-store-uri {uri})"


def log_to_run(uri: str, run_id: str, metrics: Mapping[str, float], step: int,
               tags: Mapping[str, Any] | None = None) -> None:
    """Log ``metrics`` at ``step`` and ``tags`` into an existing run (any status; the status
    is left as it is): what ``vqkit eval`` writes back. A run that is missing or a store
    that cannot be reached is a user error naming the store."""
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    try:
        client = _client(uri)
        client.get_run(run_id)
        client.log_batch(
            run_id,
            metrics=[Metric(k, _metric_value(v), ts, int(step)) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in (tags or {}).items()],
        )
    except Exception as exc:
        from vqkit.errors import VqkitError

        if isinstance(exc, VqkitError):
            raise
        raise VqkitError(f"cannot log to MLflow run {run_id} at {uri}: {_short(exc)}") from None


def log_missing_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int,
                        tags: Mapping[str, Any] | None = None) -> dict[str, float]:
    """:func:`log_to_run` for the metrics whose ``(key, step)`` the run does not have yet:
    every ``(key, step)`` is in the store once (what ``vqkit eval`` writes back next to the
    training's own evaluation). Returns ``{key: value in the run}`` of those left out."""
    try:
        client = _client(uri)
        have = {}
        for key in metrics:
            for m in client.get_metric_history(run_id, key):
                if int(m.step) == int(step):
                    have[key] = float(m.value)
    except Exception as exc:
        from vqkit.errors import VqkitError

        if isinstance(exc, VqkitError):
            raise
        raise VqkitError(f"cannot log to MLflow run {run_id} at {uri}: {_short(exc)}") from None
    log_to_run(uri, run_id, {k: v for k, v in metrics.items() if k not in have}, step, tags)
    return have


#: ``vqkit ui``'s default --host and --port
UI_DEFAULT_HOST = "127.0.0.1"
UI_DEFAULT_PORT = 5000
#: where ``vqkit ui`` serves a local store by default
UI_DEFAULT_BASE = f"http://{UI_DEFAULT_HOST}:{UI_DEFAULT_PORT}"


def ui_base(uri: str) -> str:
    """The address of the UI that shows store ``uri``: the server itself for an http(s)
    store, else what ``vqkit ui`` serves it at by default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT_BASE


def compare_url(base: str, run_ids: Iterable[str], experiment_ids: Iterable[str]) -> str:
    """MLflow's compare-runs page of ``run_ids`` (params, metrics and charts of those runs side
    by side: a sweep's children, which the experiment's run list shows folded under their
    parent), in "Model training" mode."""
    runs = json.dumps(list(run_ids), separators=(",", ":"))
    exps = json.dumps(sorted({str(e) for e in experiment_ids}), separators=(",", ":"))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}&workflowType=machine_learning"


def children_url(base: str, experiment_id: str, parent_run_id: str, charts: bool = True) -> str:
    """The experiment page listing the children of sweep ``parent_run_id`` flat, by name.

    MLflow's run list nests child runs under their parent, folded, whenever it is neither
    filtered nor sorted by anything but start time (3.17's bundled UI: ``nestChildren``); this
    page filters it to the children (``searchFilter`` ``tags.`mlflow.parentRunId` = '<id>'``)
    and sorts them by run name, in "Model training" mode, on the chart view (``charts``: line
    charts of every metric and the ``reconstructions`` image chart, one colour per child) or
    the table. Nothing is written to the store: it is the filter a user would type."""
    from urllib.parse import quote, urlencode

    query = {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
             "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true",
             "compareRunsMode": "CHART" if charts else "TABLE", "workflowType": "machine_learning"}
    return (f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id), safe='')}/runs?"
            + urlencode(query, quote_via=quote))
