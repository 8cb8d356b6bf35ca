"""CLI subcommands; each module exposes ``configure_<cmd>(parser)`` and ``run_<cmd>(args)``."""
