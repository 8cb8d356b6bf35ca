"""``vqkit plugins`` and ``vqkit components``."""
from __future__ import annotations

import json

from vqkit.commands._table import table
from vqkit.errors import Problem, VqkitError, suggest

ALIASES = {"loss": "perceptual_losses", "losses": "perceptual_losses", "resets": "reset_policies",
           "reset": "reset_policies", "data": "datasets"}


def _kind(text: str) -> str:
    """Accept 'encoders', 'encoder', 'perceptual-losses', 'reset_policy'..."""
    from vqkit.interfaces import KINDS

    norm = text.strip().lower().replace("-", "_")
    norm = ALIASES.get(norm, norm)
    for kind in KINDS:
        if norm in (kind, kind[:-1], kind.replace("ies", "y")):
            return kind
    raise VqkitError(Problem(f"unknown component kind {text!r}" + suggest(norm, KINDS)))


def configure_plugins(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_plugins(args) -> int:
    import vqkit.plugins as vp

    # `vqkit plugins` always works: under VQKIT_STRICT_PLUGINS=1 it still lists broken ones
    registry = vp._REGISTRY or vp.build_registry(strict=False)
    plugins = registry.plugins
    if args.json:
        print(json.dumps([pl.to_json() for pl in plugins], indent=2))
        return 0
    rows = []
    for pl in plugins:
        n = sum(len(v) for v in pl.components.values())
        rows.append((pl.name, pl.distribution, pl.version, pl.status, n, pl.error or ""))
    print(table(["plugin", "distribution", "version", "status", "components", "error"], rows))
    if registry.clashes:
        print("\nname clashes (only recipes using these names fail):")
        for line in registry.clash_lines():
            print(f"  {line}")
    return 0


def configure_components(p) -> None:
    p.add_argument("kind", nargs="?", help="component kind, e.g. encoders, quantizers, perceptual_losses")
    p.add_argument("pattern", nargs="?", help="wildcard filter on names, e.g. 'pixel-*'")
    p.add_argument("--json", action="store_true", help="machine-readable output (includes params schemas)")


def _params_line(entry) -> str:
    parts = []
    for name, field in entry.cls.Params.model_fields.items():
        ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        default = field.get_default(call_default_factory=True)
        parts.append(f"{name}: {ann} = {default!r}")
    return "; ".join(parts)


def run_components(args) -> int:
    from vqkit.plugins import get_registry

    kind = _kind(args.kind) if args.kind else None
    entries = get_registry().entries(kind, args.pattern)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    rows = [(e.kind, e.name, e.distribution or e.plugin, e.summary) for e in entries]
    print(table(["kind", "name", "provided by", "summary"], rows))
    if kind:
        for e in entries:
            print(f"\n{e.name}: {_params_line(e) or '(no params)'}")
    return 0
