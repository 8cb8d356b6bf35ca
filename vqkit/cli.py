"""The ``vqkit`` command line: argument parsing, exit codes and printing only.

Each subcommand lives in a module of :mod:`vqkit.commands` exposing
``configure(parser)`` and ``run(args) -> int``; modules are imported when the parser is
built, so they must import heavy libraries (torch, mlflow) inside ``run`` only.
User errors (:class:`~vqkit.errors.VqkitError`) print ``vqkit: error: ...`` lines and
exit 2 without a traceback; internal bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from vqkit import __version__
from vqkit.errors import EXIT_USER_ERROR, PluginWarning, Problem, RecipeWarning, VqkitError, suggest

#: (command, module in vqkit.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("plugins", "listing", "list plugin distributions and their status"),
    ("components", "listing", "list registered components and their params"),
    ("validate", "recipes", "validate recipes and report every problem"),
    ("explain", "recipes", "print the normalized recipe (defaults filled in)"),
    ("train", "train", "train a model from a recipe, logging to MLflow (--resume to continue)"),
    ("eval", "evaluate", "evaluate a checkpoint or run on its test split (PSNR, SSIM, LPIPS, FD) and log it into the run"),
    ("sweep", "sweep", "train every combination of a grid as nested MLflow runs (resumable)"),
    ("compare", "compare", "compare MLflow runs: params that differ, final metrics, plots, image grids"),
    ("ui", "ui", "open MLflow's UI on a tracking store (default: ./mlflow.db)"),
    ("sync", "train", "send tracking operations buffered while MLflow was unreachable"),
    ("weights", "weights", "create (fetch) and list pretrained weights, e.g. for lpips"),
    ("prior", "prior", "train a prior over a trained autoencoder's codes (`vqkit prior train`)"),
    ("sample", "sample", "draw images from a trained prior, decoded by its autoencoder"),
]


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`VqkitError` instead of exiting, with suggestions."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "invalid choice" in message and self._subparsers is not None:
            bad = message.split("invalid choice: ")[1].split(" ")[0].strip("'")
            choices = [name for name, _, _ in COMMANDS]
            raise VqkitError(Problem(f"unknown command {bad!r}" + suggest(bad, choices)))
        raise VqkitError(Problem(f"{self.prog}: {message}"))


def _unknown_option(parser: argparse.ArgumentParser, extra: list[str]) -> VqkitError:
    first = extra[0]
    opts = [o for a in parser._actions for o in a.option_strings]
    if first.startswith("-"):
        return VqkitError(Problem(f"{parser.prog}: unknown option {first!r}" + suggest(first, opts)))
    return VqkitError(Problem(f"{parser.prog}: unexpected argument {first!r}"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vqkit", description="Train vector-quantized autoencoders from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"vqkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.set_defaults(_parser=parser)
    for name, module, help_text in COMMANDS:
        mod = importlib.import_module(f"vqkit.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_parser=p)
        getattr(mod, f"configure_{name.replace('-', '_')}")(p)
        p.set_defaults(_run=getattr(mod, f"run_{name.replace('-', '_')}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow's artifact download bars (tqdm) are not vqkit's output, and ignore --quiet
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings():
        _plugin_warnings_as_lines()
        return _main(argv)


def _plugin_warnings_as_lines() -> None:
    """Show plugin and recipe warnings as one ``vqkit: warning:`` line on stderr, no source
    lines, each text once per command."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (PluginWarning, RecipeWarning)):
            print(f"vqkit: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("default", PluginWarning)
    warnings.simplefilter("default", RecipeWarning)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unknown_option(args._parser, extra)
        if not getattr(args, "_run", None):
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args._run(args) or 0)
    except VqkitError as exc:
        for problem in exc.problems:
            print(f"vqkit: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun, rank 0 speaks for all
            print("vqkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:  # console_scripts target
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
