"""``vqkit ui``: MLflow's UI on the tracking store vqkit logs to (``mlflow server``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from vqkit.errors import Problem, VqkitError


def configure_ui(p) -> None:
    p.add_argument("target", nargs="?", metavar="RUN_DIR",
                   help="a run dir: open the store its run logged to (default: --tracking-uri)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
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
    return [f"{name}: {ui_url(base, exp_id)}" for exp_id, name in experiments(uri) if name != "Default"]


def run_ui(args) -> int:
    from vqkit.tracking import read_run_info, resolve_runs, resolve_tracking_uri

    uri = args.tracking_uri
    run = None
    if args.target:
        info = read_run_info(args.target)
        if not info:
            raise VqkitError(Problem(f"{args.target} is not a vqkit run dir (no run.json)"))
        uri = info["tracking_uri"]
        if info.get("run_id"):
            found = resolve_runs(uri, [info["run_id"]])[0]
            run = {"run_id": found["run_id"], "experiment_id": found["experiment_id"],
                   "experiment": info.get("experiment")}
    uri = resolve_tracking_uri(uri)
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
    print(f"vqkit: MLflow UI on {base} for {uri} (Ctrl-C stops it); open:", file=sys.stderr)
    for line in pages:
        print(f"  {line}", file=sys.stderr)
    return subprocess.call(argv, env=env)
