"""``vqkit ui``: MLflow's UI on the tracking store vqkit logs to (``mlflow server``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from vqkit.errors import Problem, VqkitError


def configure_ui(p) -> None:
    from vqkit.tracking import UI_DEFAULT_HOST, UI_DEFAULT_PORT

    p.add_argument("target", nargs="?", metavar="RUN_DIR",
                   help="a run dir: open the store its run logged to (default: --tracking-uri)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--host", default=UI_DEFAULT_HOST, help=f"address to listen on (default: {UI_DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=UI_DEFAULT_PORT, help=f"port (default: {UI_DEFAULT_PORT})")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the mlflow command instead of running it")


def ui_argv(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command serving ``uri`` (artifacts are read where each
    experiment stores them: next to the database for vqkit's sqlite stores)."""
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow") or "mlflow"
    return [mlflow, "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]


def links(uri: str, base: str, run: dict | None = None) -> list[str]:
    """The UI pages to open: the run's (for a run dir), else each experiment's runs, in
    MLflow's "Model training" mode."""
    from vqkit.tracking import experiments, ui_url

    if run is not None:
        return [f"{run.get('experiment')}: {ui_url(base, run['experiment_id'], run['run_id'])}"]
    return [f"{name}: {ui_url(base, exp_id)}" for exp_id, name in experiments(uri) if name != "Default"] + sweep_links(uri, base)


def sweep_links(uri: str, base: str) -> list[str]:
    """For each sweep (a parent run with nested children), the experiment's run list filtered
    to its children (listed flat; unfiltered, the list shows a sweep as one folded parent
    row) and MLflow's compare-runs page of them."""
    from vqkit.tracking import children_url, compare_url, search_runs

    runs = search_runs(uri)
    by_id = {r["run_id"]: r for r in runs}
    children: dict[str, list[dict]] = {}
    for r in runs:
        parent = r["tags"].get("mlflow.parentRunId")
        if parent in by_id and by_id[parent]["tags"].get("vqkit.sweep.role") == "parent":
            children.setdefault(parent, []).append(r)
    out = []
    for parent, kids in children.items():
        kids.sort(key=lambda r: (r["run_name"] or "", r["run_id"]))
        charts = children_url(base, by_id[parent]["experiment_id"], parent)
        url = compare_url(base, [r["run_id"] for r in kids], [r["experiment_id"] for r in kids])
        out.append(f"sweep {by_id[parent]['run_name']!r} ({parent[:8]}), its {len(kids)} children: {charts}")
        out.append(f"  their params and metrics side by side: {url}")
    return out


def _servable(uri: str) -> str:
    """``uri`` resolved; a file store that ``mlflow server`` would exit on is a user error
    now, before any server starts (:func:`vqkit.tracking.file_store_problem`)."""
    from vqkit.tracking import file_store_problem, resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    problem = file_store_problem(uri, ui=True)
    if problem is not None:
        raise VqkitError(Problem(problem))
    return uri


def run_ui(args) -> int:
    from vqkit.tracking import read_run_info, resolve_runs

    uri = args.tracking_uri
    run = None
    if args.target:
        info = read_run_info(args.target)
        if not info:
            raise VqkitError(Problem(f"{args.target} is not a vqkit run dir (no run.json)"))
        uri = _servable(info["tracking_uri"])
        if info.get("run_id"):
            found = resolve_runs(uri, [info["run_id"]])[0]
            run = {"run_id": found["run_id"], "experiment_id": found["experiment_id"],
                   "experiment": info.get("experiment")}
    uri = _servable(uri)
    if uri.startswith(("http://", "https://")):
        print(f"vqkit: {uri} is a tracking server: open it in a browser")
        for line in links(uri, uri, run):
            print(f"  {line}")
        return 0
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise VqkitError(Problem(f"no MLflow store at {uri} (train something first, or give --tracking-uri)"))
    argv = ui_argv(uri, args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    pages = links(uri, base, run)
    if args.print_only:
        print(" ".join(argv))
        print("vqkit: then open:\n" + "\n".join(f"  {line}" for line in pages), file=sys.stderr)
        return 0
    try:
        import mlflow.server  # noqa: F401  (the full mlflow package, not mlflow-skinny)
    except ImportError:
        raise VqkitError(Problem("MLflow's UI needs the full mlflow package: pip install 'vqkit[mlflow-server]' "
                                 "(or pip install 'mlflow>=3,<4')")) from None
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"vqkit: MLflow UI on {base} for {uri} (Ctrl-C or kill {os.getpid()} stops it); open:", file=sys.stderr)
    for line in pages:
        print(f"  {line}", file=sys.stderr)
    return serve(argv, env)


#: seconds the server's process group gets to stop after a forwarded signal, then SIGKILL
STOP_GRACE_S = 15.0
#: the signals that stop ``vqkit ui`` (and so the server): kill PID, Ctrl-C, terminal closed
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def serve(argv: list[str], env: dict | None) -> int:
    """Run the server ``argv`` in a process group of its own and stop the whole group (``mlflow
    server`` and its uvicorn worker) when this process gets SIGTERM, SIGINT or SIGHUP: the
    signal is forwarded to the group, which gets :data:`STOP_GRACE_S` seconds before SIGKILL
    (what the group leaves when the server exits by itself is stopped the same way). Returns
    the server's exit code, or 128 + the signal's number when stopped by one."""
    import signal
    import time

    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    got: list[int] = []
    since: list[float] = []

    def forward(signum, frame):
        got.append(signum)
        since.append(time.monotonic())
        _signal_group(proc.pid, signum)

    sigs = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    saved = {s: signal.signal(s, forward) for s in sigs}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if since and time.monotonic() - since[0] > STOP_GRACE_S:
                    _signal_group(proc.pid, signal.SIGKILL)  # it did not stop in time
        deadline = time.monotonic() + STOP_GRACE_S
        _signal_group(proc.pid, signal.SIGTERM)
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    if got:
        print(f"vqkit: MLflow UI stopped ({signal.Signals(got[0]).name})", file=sys.stderr)
        return 128 + got[0]
    return rc


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies waiting for their
    parent to read their status do not count)."""
    try:
        import psutil
    except ImportError:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) == pgid:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False
