"""``vqkit train`` and ``vqkit sync`` (``vqkit eval``: :mod:`vqkit.commands.evaluate`; ``vqkit compare``: :mod:`vqkit.commands.compare`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from vqkit.errors import Problem, VqkitError
from vqkit.runtime import cpu_friendly_threads, keep_freed_memory


def _add_set(p) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a recipe key (value parsed as YAML); repeatable",
    )


# =========================================================================== resolving runs
def _output_roots(recipe=None) -> list[Path]:
    roots = [Path("runs")]
    if recipe is not None:
        roots.insert(0, Path(recipe.model.tracking.output_dir))
    return roots


def resolve_checkpoint(target: str, recipe=None, tracking_uri: str | None = None) -> Path:
    """A checkpoint file for ``target``: a checkpoint file, a run dir (its newest
    checkpoint), or an MLflow run (full id, unique id prefix or run name: see
    :func:`vqkit.tracking.resolve_run_id`; its local run dir if found, else downloaded)."""
    from vqkit.train.checkpoint import latest_checkpoint

    path = Path(target)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            found = latest_checkpoint(folder)
            if found is not None:
                return found
        nothing_to_resume(path)
        raise VqkitError(f"no checkpoint in {path} (looked in {path / 'checkpoints'})")
    if os.sep in target or target.endswith(".pt"):
        raise VqkitError(f"checkpoint or run dir not found: {target}")
    from vqkit.tracking import download_checkpoint, find_run_dir, resolve_tracking_uri

    run_dir = find_run_dir(target, _output_roots(recipe))
    if run_dir is None:  # not a local run dir: the store names it (full id, unique id prefix or run name)
        from vqkit.tracking import resolve_run_id

        store = resolve_tracking_uri(tracking_uri or (recipe.model.tracking.uri if recipe is not None else None))
        target = resolve_run_id(store, target)
        run_dir = find_run_dir(target, _output_roots(recipe))
    if run_dir is not None:
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is not None:
            return found
        nothing_to_resume(run_dir)
    uri = resolve_tracking_uri(tracking_uri or (recipe.model.tracking.uri if recipe is not None else None))
    dest = run_dir or (_output_roots(recipe)[0].resolve() / target)
    return download_checkpoint(uri, target, dest)


def nothing_to_resume(run_dir: Path) -> None:
    """Raise the user error for a vqkit run dir without any checkpoint: the run is still
    training in another process (it holds the run lock: left alone), or it stopped before
    its first checkpoint (its MLflow run, if still RUNNING, is marked KILLED with a
    ``vqkit.failure`` tag, since nothing can resume it). Returns when ``run_dir`` is not a
    vqkit run dir."""
    from vqkit.runtime import run_in_progress
    from vqkit.tracking import read_run_info

    info = read_run_info(run_dir)
    if not info:
        return
    run_dir = Path(run_dir).resolve()
    run_id = info.get("run_id")
    who = f"MLflow run {run_id}" if run_id else f"the run in {run_dir}"
    if run_in_progress(run_dir):
        raise VqkitError(f"{who} is still being trained by another process (its run dir {run_dir} is locked) "
                         "and has no checkpoint yet; let it run, or stop it first")
    recipe_file = run_dir / "recipe.yaml"
    details = []
    command = "vqkit train"
    try:
        from vqkit import yamlsafe

        saved = yamlsafe.safe_load(recipe_file.read_text(encoding="utf-8"))
        if saved.get("kind") == "prior":
            command = "vqkit prior train"
        details.append(f"train.checkpoint_every={saved['train']['checkpoint_every']}")
    except Exception:  # noqa: BLE001 - the details are a courtesy
        pass
    marked = False
    if run_id and info.get("tracking_uri"):
        try:
            marked, step = _mark_dead_run(info["tracking_uri"], run_id)
            if step is not None:
                details.append(f"last logged step {step}")
        except Exception:  # noqa: BLE001 - an unreachable store leaves the run as it is
            pass
    start = f"`{command} {recipe_file}`" if recipe_file.is_file() else "its recipe"
    raise VqkitError(
        f"{who} stopped before its first checkpoint" + (f" ({'; '.join(details)})" if details else "")
        + f": nothing to resume; start it again with {start}"
        + (" (the run is now marked KILLED)" if marked else "")
    )


def _mark_dead_run(uri: str, run_id: str) -> tuple[bool, int | None]:
    """``(marked, last logged step)``: a RUNNING run whose process is gone and that has no
    checkpoint is ended KILLED with ``vqkit.failure``."""
    from vqkit.tracking import _client

    client = _client(uri)  # a lookup: a moved or deleted store is an error, never created
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "loss/total")]
    step = max(steps) if steps else None
    if run.info.status != "RUNNING" or run.data.tags.get("vqkit.last_checkpoint"):
        return False, step
    client.set_tag(run_id, "vqkit.failure",
                   "stopped before its first checkpoint (its process is gone; found by vqkit train --resume)")
    client.set_terminated(run_id, "KILLED")
    return True, step


def resume_state(target: str, recipe=None) -> tuple[Path, dict]:
    """``(checkpoint path, state)`` to resume from. A checkpoint file is loaded as it is
    (damaged: refused); a run dir or run id falls back to its newest intact checkpoint,
    saying on stderr which newer files were skipped and why."""
    from vqkit.train.checkpoint import load_checkpoint, newest_intact

    path = resolve_checkpoint(target, recipe)
    if Path(target).is_file():
        return path, load_checkpoint(path)
    found = newest_intact(path.parent, warn=lambda text: print(f"vqkit: warning: {text}", file=sys.stderr))
    return found if found is not None else (path, load_checkpoint(path))


# =========================================================================== train
def configure_train(p) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="recipe YAML (optional with --resume: the checkpoint's recipe is used)")
    _add_set(p)
    p.add_argument("--resume", metavar="RUN_ID_OR_PATH",
                   help="continue a run: MLflow run id (or unique id prefix, or run name), run dir or checkpoint file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (runs torchrun; gloo on CPU)")
    p.add_argument("--parent-run", metavar="RUN_ID",
                   help="log as a nested child of this MLflow run (what `vqkit sweep` does)")


def _recipe_for(args):
    """The recipe named on the command line (``None`` when resuming without one)."""
    from vqkit.recipe import load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.model.tracking.run_name is None and args.overrides:
            from vqkit.sweep import overrides_name

            # a run trained with --set is named for what they change
            recipe.model.tracking.run_name = overrides_name(recipe.model.name, args.overrides)
        return recipe
    if not args.resume:
        raise VqkitError(Problem("vqkit train: give a RECIPE (or --resume RUN_ID_OR_PATH)"))
    return None


def _checkpoint_recipe(state, path: Path, overrides: list[str]):
    """The recipe stored in a checkpoint, with ``--set`` overrides applied."""
    from vqkit.recipe import recipe_from_dict
    from vqkit.train.build import missing_plugin_error

    try:
        return recipe_from_dict(state["recipe"], f"{path}#recipe", overrides)
    except VqkitError as exc:  # e.g. a plugin the run used was uninstalled: say which
        raise missing_plugin_error(exc, state) from None


def run_train(args) -> int:
    cpu_friendly_threads()
    keep_freed_memory()
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn(args)
    if args.nproc < 1:
        raise VqkitError(Problem(f"--nproc must be >= 1, got {args.nproc}"))
    from vqkit.train.trainer import Trainer

    recipe = _recipe_for(args)
    if recipe is not None and recipe.kind == "prior":
        raise VqkitError(Problem(f"{args.recipe} is a prior recipe (kind: prior); train it with "
                                 "`vqkit prior train`", file=args.recipe))
    state = path = None
    if args.resume:
        path, state = resume_state(args.resume, recipe)
        if state.get("family") == "prior":
            raise VqkitError(f"{path} is a prior checkpoint; resume it with `vqkit prior train --resume`")
        if recipe is None:
            recipe = _checkpoint_recipe(state, path, args.overrides)
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    tags = {"mlflow.parentRunId": args.parent_run} if args.parent_run else None
    trainer = Trainer(recipe, resume=state, resume_path=path, quiet=quiet, tags=tags)
    # a finished run resumed from a checkpoint file is continued in a new run
    trainer.continue_finished_runs = not (args.resume and Path(args.resume).is_file())
    trainer.run()
    return 0


def _spawn(args) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes on this machine."""
    argv = ["train"]
    if args.recipe:
        argv.append(args.recipe)
    for text in args.overrides:
        argv += ["--set", text]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.quiet:
        argv.append("--quiet")
    if args.parent_run:
        argv += ["--parent-run", args.parent_run]
    cmd = [sys.executable, "-m", "vqkit.train.torchrun", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "vqkit.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    # torchrun and its ranks in their own session: a Ctrl-C (or a signal to this process)
    # reaches them once, through torchrun, which passes it on to every rank
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:  # pragma: no cover - it just ended
            pass

    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, forward) for s in sigs}
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code


# =========================================================================== sync
def configure_sync(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs with a tracking_buffer.jsonl")


def run_sync(args) -> int:
    from vqkit.tracking import BUFFER, Tracker

    failed = False
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / BUFFER).is_file():
            print(f"{run_dir}: nothing to send")
            continue
        tracker = Tracker.from_run_dir(run_dir)
        if tracker.flush():
            Path(run_dir, BUFFER).unlink(missing_ok=True)
            print(f"{run_dir}: sent; {tracker.describe()}")
        else:
            failed = True
            print(f"vqkit: error: {run_dir}: {tracker.uri} still unreachable; "
                  f"{tracker.pending} operations kept", file=sys.stderr)
    return 2 if failed else 0
