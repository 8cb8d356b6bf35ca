"""``vqkit validate`` and ``vqkit explain``."""
from __future__ import annotations

import dataclasses
import json
import sys

from vqkit.errors import VqkitError


def _add_set(p) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a recipe key (value parsed as YAML); repeatable",
    )


def configure_validate(p) -> None:
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of problems per recipe")
    p.add_argument(
        "--build", action="store_true",
        help="also build every component (data sets, model, losses, discriminator, reset policy) and push "
        "one batch of the data's image shape through them without training (what `vqkit train` checks "
        "before it creates a run), so problems between components (decoder vs encoder factor, image size "
        "vs factor, discriminator or loss network, every unreadable image, a train split smaller than a "
        "batch, missing data or weight files) are reported too",
    )


def run_validate(args) -> int:
    from vqkit.recipe import load_recipe

    report = []
    failed = False
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.overrides)
            if args.build:
                from vqkit.train.build import build_all

                if recipe.kind == "prior":  # the autoencoder it names, and the prior for its grid
                    from vqkit.prior.family import check_prior_build as build_all  # noqa: F811
                try:
                    built = build_all(recipe)
                    _check_data(built)
                    if recipe.kind != "prior":
                        from vqkit.train.build import check_runtime

                        check_runtime(recipe)  # the device, the eval metrics' weights
                except VqkitError as exc:  # locate build problems in the recipe file
                    from vqkit.train.build import in_recipe_file

                    raise in_recipe_file(exc, recipe) from None
            report.append({"recipe": path, "ok": True, "problems": [],
                           "warnings": [w.to_json() for w in recipe.warnings]})
            if not args.json:
                print(f"{path}: ok")
        except VqkitError as exc:
            failed = True
            report.append({"recipe": path, "ok": False, "problems": [p.to_json() for p in exc.problems],
                           "warnings": []})
            if not args.json:
                for problem in exc.problems:
                    print(f"vqkit: error: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 2 if failed else 0


def _check_data(built) -> None:
    """Run each split's ``check()`` (e.g. decode every image file); the problems of both
    splits are reported together, located at ``data``."""
    from vqkit.train.build import merge_problems

    found = []
    for split in ("train_data", "test_data"):
        check = getattr(getattr(built, split, None), "check", None)
        if callable(check):
            try:
                check()
            except VqkitError as exc:
                found.append([dataclasses.replace(p, path=p.path or "data") for p in exc.problems])
    if getattr(built, "recipe", None) is not None and getattr(built, "train_data", None) is not None:
        from vqkit.train.data import StepBatches

        tc = built.recipe.model.train
        try:  # the train split holds at least one batch (as training checks, one process)
            StepBatches(built.train_data, tc.batch_size, built.recipe.model.seed)
        except VqkitError as exc:
            found.append(exc.problems)
    if found:
        raise VqkitError(merge_problems(found))


def configure_explain(p) -> None:
    p.add_argument("recipe", metavar="RECIPE")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def run_explain(args) -> int:
    from vqkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(recipe.to_dict(), indent=2))
    else:
        sys.stdout.write(recipe.to_yaml())
    return 0
