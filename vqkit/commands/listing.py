"""``vqkit plugins`` and ``vqkit components``."""
from __future__ import annotations

import json

from vqkit.commands._table import table
from vqkit.errors import Problem, VqkitError, suggest

ALIASES = {"loss": "perceptual_losses", "losses": "perceptual_losses", "resets": "reset_policies",
           "reset": "reset_policies", "data": "datasets",
           "search": "searches"}


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


_SCALARS = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "None"}
_BOUNDS = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))


def type_text(schema: dict, defs: dict) -> str:
    """A param's full type from its JSON schema, with its constraints: ``list[int ≥ 2]``,
    ``int ≥ 1``, ``float > 0 | None``, ``'hinge' | 'non-saturating'``, ``list[int] (≥ 1 items)``."""
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if "anyOf" in schema:
        return " | ".join(type_text(s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            text = "tuple[" + ", ".join(type_text(s, defs) for s in schema["prefixItems"]) + "]"
        else:
            text = f"list[{type_text(schema.get('items', {}), defs)}]" if schema.get("items") else "list"
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        if "prefixItems" not in schema and (lo or hi is not None):
            bounds = [f"≥ {lo}" if lo else "", f"≤ {hi}" if hi is not None else ""]
            text += f" ({', '.join(b for b in bounds if b)} items)"
        return text
    if kind == "object":
        values = schema.get("additionalProperties")
        return f"dict[str, {type_text(values, defs)}]" if isinstance(values, dict) else "dict"
    text = _SCALARS.get(kind, kind or "any")
    bounds = [f"{sign} {schema[key]}" for key, sign in _BOUNDS if key in schema]
    return f"{text} {', '.join(bounds)}" if bounds else text


def _params_table(entry) -> str:
    """Every param of a component: name, full type, default and description."""
    schema = entry.params_schema()
    defs = schema.get("$defs", {})
    rows = []
    for name, field in entry.cls.Params.model_fields.items():
        prop = schema.get("properties", {}).get(name, {})
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((name, type_text(prop, defs), default, field.description or ""))
    return table(["param", "type", "default", "description"], rows) if rows else "(no params)"


def run_components(args) -> int:
    from vqkit.plugins import get_registry

    kind = _kind(args.kind) if args.kind else None
    entries = get_registry().entries(kind, args.pattern)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    rows = [(e.kind, e.name, e.distribution or e.plugin, e.summary) for e in entries]
    print(table(["kind", "name", "provided by", "summary"], rows))
    if kind:  # one kind: every component's params and capabilities in full
        for e in entries:
            caps = ", ".join(f"{k} = {v}" for k, v in e.cls.capabilities().items())
            print(f"\n{e.name} ({e.distribution or e.plugin} {e.version or ''}".rstrip() + f"): {e.summary}")
            if caps:
                print(f"capabilities: {caps}")
            print(_params_table(e))
    return 0
