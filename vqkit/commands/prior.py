"""``vqkit prior train``: train a prior over a trained autoencoder's codes."""
from __future__ import annotations

import os
from pathlib import Path

from vqkit.errors import Problem, VqkitError
from vqkit.runtime import cpu_friendly_threads, keep_freed_memory

SUBCOMMANDS = ["train"]


def configure_prior(p) -> None:
    class PriorParser(type(p)):  # the suggestions name the prior subcommands
        def error(self, message: str) -> None:
            if "invalid choice" in message:
                from vqkit.errors import suggest

                bad = message.split("invalid choice: ")[1].split(" ")[0].strip("'")
                raise VqkitError(Problem(f"unknown command 'prior {bad}'" + suggest(bad, SUBCOMMANDS)))
            super().error(message)

    p.__class__ = PriorParser
    sub = p.add_subparsers(dest="prior_command", metavar="COMMAND", parser_class=type(p).__mro__[1])
    t = sub.add_parser("train", help="train a prior from a `kind: prior` recipe, logging to MLflow",
                       description="Train a prior over the codes of a trained autoencoder (a `kind: prior` "
                       "recipe naming it in `autoencoder:`), logging to MLflow.")
    t.set_defaults(_parser=t, _run=run_prior_train)
    t.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="prior recipe YAML (optional with --resume: the checkpoint's recipe is used)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key (value parsed as YAML); repeatable")
    t.add_argument("--resume", metavar="RUN_ID_OR_PATH",
                   help="continue a prior run: MLflow run id (or unique id prefix, or run name), run dir or checkpoint file")
    t.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def run_prior(args) -> int:
    args._parser.print_help()
    return 2


def run_prior_train(args, stop_after: int | None = None) -> int:
    cpu_friendly_threads()
    keep_freed_memory()
    from vqkit.commands.train import _checkpoint_recipe, resolve_checkpoint
    from vqkit.prior.family import PriorFamily
    from vqkit.recipe import load_recipe
    from vqkit.train.checkpoint import load_checkpoint
    from vqkit.train.loop import TrainLoop

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    if recipe is not None and recipe.model.tracking.run_name is None and args.overrides:
        from vqkit.sweep import overrides_name

        # a run trained with --set is named for what they change (as `vqkit train`)
        recipe.model.tracking.run_name = overrides_name(recipe.model.name, args.overrides)
    if recipe is None and not args.resume:
        raise VqkitError(Problem("vqkit prior train: give a RECIPE (or --resume RUN_ID_OR_PATH)"))
    state = path = None
    if args.resume:
        path = resolve_checkpoint(args.resume, recipe)
        state = load_checkpoint(path)
        if state.get("family") != "prior":
            raise VqkitError(f"{path} is an autoencoder checkpoint; resume it with `vqkit train --resume`")
        if recipe is None:
            recipe = _checkpoint_recipe(state, path, args.overrides)
    if recipe.kind != "prior":
        raise VqkitError(Problem(f"{args.recipe} is an autoencoder recipe (no `kind: prior`); train it with "
                                 "`vqkit train`", file=args.recipe))
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    loop = TrainLoop(recipe, PriorFamily(), resume=state, resume_path=path, quiet=quiet, stop_after=stop_after,
                     entry_point="vqkit prior train")
    # a finished run resumed from a checkpoint file is continued in a new run (as `vqkit train`)
    loop.continue_finished_runs = not (args.resume and Path(args.resume).is_file())
    loop.run()
    return 0
