"""Plugin machinery: the pluggy manager, entry-point loading and component registries.

Plugins (the built-ins included) are entry points of the ``vqkit`` group. They are
loaded lazily, on the first call to :func:`get_registry`, one entry point at a time:

* a plugin that fails to import, or whose hook raises, is recorded as ``broken`` with
  its error, warned about once on stderr and skipped; ``VQKIT_STRICT_PLUGINS=1`` makes
  that fatal (:class:`~vqkit.errors.VqkitError`);
* ``VQKIT_DISABLE_PLUGINS=a,b`` blocks entry points by name (recorded as ``blocked``);
  ``DIST:NAME`` blocks only the entry point ``NAME`` of distribution ``DIST``;
* two components with one name in one kind (a name clash) are both kept: every command
  warns once, ``vqkit plugins`` lists the clash with both distributions, and only a
  recipe (or lookup) that uses the ambiguous name fails, naming both distributions and
  the entry point to block; ``VQKIT_STRICT_PLUGINS=1`` makes any clash fatal. A built-in
  is never replaced: blocking the third-party plugin leaves the built-in in place.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata as md
import inspect
import os
import warnings
from typing import Any, Callable, Iterable

import pluggy

from vqkit import hookspecs
from vqkit.errors import PluginWarning, VqkitError, suggest
from vqkit.interfaces import KINDS

ENTRY_POINT_GROUP = "vqkit"
#: the distribution whose entry points are the built-in components
BUILTIN_DISTRIBUTION = "vqkit"
STRICT_ENV = "VQKIT_STRICT_PLUGINS"
DISABLE_ENV = "VQKIT_DISABLE_PLUGINS"

# kind -> singular noun used in messages
NOUNS = {
    "encoders": "encoder",
    "quantizers": "quantizer",
    "decoders": "decoder",
    "perceptual_losses": "perceptual loss",
    "reset_policies": "reset policy",
    "datasets": "dataset",
    "discriminators": "discriminator",
    "priors": "prior",
    "launchers": "launcher",
    "searches": "search",
}


@dataclasses.dataclass
class PluginInfo:
    """One entry point of the ``vqkit`` group."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    status: str = "ok"  # ok | broken | blocked
    error: str | None = None
    components: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: name clashes this plugin is part of, one line each
    clashes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ComponentEntry:
    """A registered component class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def summary(self) -> str:
        return self.cls.summary() if hasattr(self.cls, "summary") else ""

    def params_schema(self) -> dict[str, Any]:
        return self.cls.Params.model_json_schema()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.summary,
            "capabilities": self.cls.capabilities(),
            "params": self.params_schema(),
        }


class Registry:
    """All components known to this process, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, ComponentEntry]] = {k: {} for k in KINDS}
        self.plugins: list[PluginInfo] = []
        #: (kind, name) -> every entry registered under that name, when more than one
        self.clashes: dict[tuple[str, str], list[ComponentEntry]] = {}

    # -- queries ---------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None, pattern: str | None = None) -> list[ComponentEntry]:
        """Registered components (sorted by kind and name; every side of a name clash)."""
        kinds = [kind] if kind else list(KINDS)
        out = []
        for k in kinds:
            for name in sorted(self._entries[k]):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    out.extend(self.clashes.get((k, name), [self._entries[k][name]]))
        return out

    def get(self, kind: str, name: str) -> ComponentEntry:
        """Look a component up; unknown names raise :class:`VqkitError` with a suggestion."""
        if kind not in self._entries:
            raise VqkitError(f"unknown component kind {kind!r}" + suggest(kind, KINDS))
        if (kind, name) in self.clashes:
            raise VqkitError(self.clash_message(kind, name))
        try:
            return self._entries[kind][name]
        except KeyError:
            raise VqkitError(self.unknown_message(kind, name)) from None

    def clash_message(self, kind: str, name: str) -> str:
        """Why ``name`` is ambiguous and how to fix it (empty when it is not)."""
        entries = self.clashes.get((kind, name))
        if not entries:
            return ""
        who = " and by ".join(
            f"plugin {e.plugin!r} (distribution {e.distribution or '?'} {e.version or ''})".replace(" )", ")")
            for e in entries
        )
        third = [e for e in entries if e.distribution != BUILTIN_DISTRIBUTION]
        blocks = [self._block_name(e) for e in (third if len(third) < len(entries) else entries[1:])]
        return (
            f"{NOUNS[kind]} {name!r} is ambiguous: registered by {who}; block the third-party one "
            f"with {DISABLE_ENV}={','.join(blocks)} (or uninstall its distribution)"
        )

    def _block_name(self, entry: ComponentEntry) -> str:
        """The ``VQKIT_DISABLE_PLUGINS`` item that blocks ``entry``'s plugin and no other."""
        same = [p for p in self.plugins if p.name == entry.plugin]
        if len(same) > 1 and entry.distribution:
            return f"{entry.distribution}:{entry.plugin}"
        return entry.plugin

    def clash_lines(self) -> list[str]:
        """One line per name clash, naming every plugin and distribution involved."""
        return [self.clash_message(kind, name) for kind, name in sorted(self.clashes)]

    def unknown_message(self, kind: str, name: str) -> str:
        msg = f"unknown {NOUNS[kind]} {name!r}" + suggest(str(name), self._entries[kind])
        broken = [p.name for p in self.plugins if p.status == "broken"]
        if broken:
            msg += f"; broken plugins not loaded: {', '.join(broken)} (see `vqkit plugins`)"
        blocked = [f"{p.name} ({p.distribution})" if p.distribution else p.name
                   for p in self.plugins if p.status == "blocked"]
        if blocked:
            msg += f"; blocked by {DISABLE_ENV}: {', '.join(blocked)}"
        return msg

    def distributions(self) -> list[str]:
        """``dist==version`` of every loaded plugin distribution (sorted, unique)."""
        seen = {
            f"{p.distribution}=={p.version}"
            for p in self.plugins
            if p.status == "ok" and p.distribution
        }
        return sorted(seen)

    # -- registration ----------------------------------------------------------------
    def _check(self, entry: ComponentEntry) -> None:
        """Raise ``TypeError`` if ``entry`` is not a valid component of its kind."""
        interface = KINDS[entry.kind]
        if not (inspect.isclass(entry.cls) and issubclass(entry.cls, interface)):
            raise TypeError(
                f"{NOUNS[entry.kind]} {entry.name!r} must be a subclass of "
                f"vqkit.interfaces.{interface.__name__}, got {entry.cls!r}"
            )
        if not isinstance(entry.name, str) or not entry.name:
            raise TypeError(f"component names must be non-empty strings, got {entry.name!r}")
        # declarations of classes that can be built (a schema-only abstract class is not)
        bad = [] if inspect.isabstract(entry.cls) else entry.cls.declaration_problems()
        if bad:
            raise TypeError(f"{NOUNS[entry.kind]} {entry.name!r} ({entry.cls.__name__}): " + "; ".join(bad))

    def _add(self, entry: ComponentEntry) -> None:
        """Add a checked entry; a second entry under one name makes a clash."""
        existing = self._entries[entry.kind].get(entry.name)
        if existing is not None:
            key = (entry.kind, entry.name)
            self.clashes.setdefault(key, [existing]).append(entry)
            return
        self._entries[entry.kind][entry.name] = entry


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    # one entry per name: a distribution found twice on sys.path is listed twice
    unique: dict[tuple[str, str], md.EntryPoint] = {}
    for ep in eps:
        unique.setdefault((ep.name, ep.value), ep)
    # built-ins first: in a name clash they are listed first and never replaced
    def key(ep: md.EntryPoint) -> tuple[bool, str, str]:
        dist = getattr(ep, "dist", None)
        name = dist.name if dist is not None else ""
        return (name != BUILTIN_DISTRIBUTION, ep.name, name)

    return sorted(unique.values(), key=key)


def build_registry(
    entry_points: Iterable[md.EntryPoint] | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
    strict: bool | None = None,
) -> Registry:
    """Load plugins and collect their components into a fresh :class:`Registry`.

    ``entry_points`` defaults to the installed ``vqkit`` group. ``extra_plugins`` are
    ``(name, module_or_object)`` pairs registered directly (used by tests). ``strict``
    defaults to ``$VQKIT_STRICT_PLUGINS``.
    """
    if strict is None:
        strict = _truthy(os.environ.get(STRICT_ENV))
    blocked = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    pm = pluggy.PluginManager("vqkit")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    loaded: list[tuple[PluginInfo, object]] = []

    def fail(info: PluginInfo, exc: BaseException, what: str, error: str | None = None,
             shown: str | None = None) -> None:
        info.status = "broken"
        info.error = error or f"{type(exc).__name__}: {exc}"
        message = (
            f"plugin {info.name!r} (distribution {info.distribution}) {what}: {shown or info.error}"
        )
        if strict:
            raise VqkitError(f"{message} [{STRICT_ENV}=1]") from exc
        warnings.warn(message + "; skipped", PluginWarning, stacklevel=3)

    eps = _entry_points() if entry_points is None else list(entry_points)
    for ep in eps:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            distribution=dist.name if dist is not None else None,
            version=dist.version if dist is not None else None,
            module=ep.value,
        )
        registry.plugins.append(info)
        if ep.name in blocked or f"{info.distribution}:{ep.name}" in blocked:
            info.status = "blocked"
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break vqkit
            fail(info, exc, "failed to import")
            continue
        try:
            # entry-point names are unique per distribution only
            pm.register(obj, name=f"{info.distribution}:{ep.name}" if info.distribution else ep.name)
        except Exception as exc:
            fail(info, exc, "could not be registered")
            continue
        loaded.append((info, obj))

    for name, obj in extra_plugins:
        info = PluginInfo(name=name, distribution=None, version=None, module=repr(obj))
        registry.plugins.append(info)
        pm.register(obj, name=name)
        loaded.append((info, obj))

    try:
        pm.check_pending()  # a misspelt hook name is an error, not silence
    except pluggy.PluginValidationError as exc:
        bad = exc.plugin
        for info, obj in loaded:
            if obj is bad:
                pm.unregister(obj)
                loaded.remove((info, obj))
                names = _unknown_hooks(obj, pm)
                if names:
                    what = ", ".join(f"{n!r}{_hook_hint(n)}" for n in names)
                    fail(info, exc, "implements an unknown hook", error=f"unknown hook {what}", shown=what)
                else:  # pragma: no cover - pluggy names the hook
                    fail(info, exc, "implements an unknown hook")
                break
        else:  # pragma: no cover - pluggy always names the plugin
            raise

    for info, obj in loaded:
        _collect(pm, registry, info, obj, fail)
    _check_blocked(blocked, eps, registry)
    _report_clashes(registry, strict)
    return registry


def _unknown_hooks(plugin: object, pm: pluggy.PluginManager) -> list[str]:
    """Names of ``plugin``'s hook implementations that no hook spec declares."""
    known = {name for name in dir(hookspecs) if name.startswith("vqkit_")}
    out = []
    for name in dir(plugin):
        if pm.parse_hookimpl_opts(plugin, name) is not None and name not in known:
            out.append(name)
    return out


def _hook_hint(name: str) -> str:
    """`` (did you mean 'vqkit_register_x'?)`` for a misspelt hook name (`` (hooks: ...)`` if
    none is close)."""
    known = [n for n in dir(hookspecs) if n.startswith("vqkit_")]
    return suggest(name, known, label="hooks", always_list=False)


def _check_blocked(blocked: set[str], eps: list[md.EntryPoint], registry: Registry) -> None:
    """Warn about ``VQKIT_DISABLE_PLUGINS`` items that block nothing (a typo: with a
    suggestion) and about a bare name that also blocks a built-in entry point of vqkit."""
    pairs = []  # (entry-point name, distribution)
    for ep in eps:
        dist = getattr(ep, "dist", None)
        pairs.append((ep.name, dist.name if dist is not None else None))
    names = {n for n, _ in pairs} | {f"{d}:{n}" for n, d in pairs if d}
    for item in sorted(blocked):
        if item not in names:
            hint = suggest(item, [n for n in names if (":" in n) == (":" in item)])
            components = [e for kind in KINDS for e in registry._entries[kind].values() if e.name == item]
            if components:  # a component's name, not its plugin's
                hint += f"; {item!r} is a component of plugin {components[0].plugin!r}: " \
                        "the variable takes plugin entry-point names (`vqkit plugins`)"
            warnings.warn(f"{DISABLE_ENV}: {item!r} matches no installed plugin entry point, so it blocks "
                          f"nothing{hint}", PluginWarning, stacklevel=4)
            continue
        dists = [d for n, d in pairs if n == item]
        if ":" not in item and BUILTIN_DISTRIBUTION in dists:
            others = sorted(f"{d}:{item}" for d in dists if d and d != BUILTIN_DISTRIBUTION)
            warnings.warn(
                f"{DISABLE_ENV}: {item!r} also blocks the built-in plugin {item!r} of {BUILTIN_DISTRIBUTION} "
                "(its components are not available); to block only another distribution's entry point of "
                f"that name write DIST:{item}" + (f" (here: {', '.join(others)})" if others else ""),
                PluginWarning, stacklevel=4)


def _report_clashes(registry: Registry, strict: bool) -> None:
    """Record each clash on its plugins; one warning for all (fatal under strict mode)."""
    if not registry.clashes:
        return
    lines = registry.clash_lines()
    for (kind, name), entries in sorted(registry.clashes.items()):
        line = registry.clash_message(kind, name)
        for e in entries:
            for info in registry.plugins:
                if info.name == e.plugin and info.distribution == e.distribution and line not in info.clashes:
                    info.clashes.append(line)
    if strict:
        raise VqkitError(f"{'; '.join(lines)} [{STRICT_ENV}=1]")
    warnings.warn(
        "; ".join(lines) + " (recipes that do not use " + ("this name" if len(lines) == 1 else "these names")
        + " are not affected)",
        PluginWarning,
        stacklevel=3,
    )


def _collect(
    pm: pluggy.PluginManager,
    registry: Registry,
    info: PluginInfo,
    plugin: object,
    fail: Callable[[PluginInfo, BaseException, str], None],
) -> None:
    """Call each of ``plugin``'s hook implementations with a ``register`` callback that
    records the plugin as the provider. All-or-nothing per plugin."""
    staged: list[ComponentEntry] = []
    try:
        for kind in KINDS:
            caller = getattr(pm.hook, f"vqkit_register_{kind}")
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue

                def register(name: str, cls: type, _kind: str = kind) -> None:
                    staged.append(
                        ComponentEntry(
                            _kind, name, cls, info.name, info.distribution, info.version
                        )
                    )

                kwargs = {"register": register}
                impl.function(**{a: kwargs[a] for a in impl.argnames})
        for entry in staged:  # all or nothing: check every entry before adding any
            registry._check(entry)
    except Exception as exc:
        fail(info, exc, "raised while registering components")
        return
    for entry in staged:
        registry._add(entry)
        info.components.setdefault(entry.kind, []).append(entry.name)


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace (or with ``None`` forget) the process-wide registry (tests)."""
    global _REGISTRY
    _REGISTRY = registry


