"""Plugin machinery: the pluggy manager, entry-point loading and component registries.

Plugins (the built-ins included) are entry points of the ``vqkit`` group. They are
loaded lazily, on the first call to :func:`get_registry`, one entry point at a time:

* a plugin that fails to import, or whose hook raises, is recorded as ``broken`` with
  its error, warned about once on stderr and skipped; ``VQKIT_STRICT_PLUGINS=1`` makes
  that fatal (:class:`~vqkit.errors.VqkitError`);
* ``VQKIT_DISABLE_PLUGINS=a,b`` blocks entry points by name (recorded as ``blocked``);
* two components with one name in one kind is an error naming both distributions.
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

    # -- queries ---------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None, pattern: str | None = None) -> list[ComponentEntry]:
        kinds = [kind] if kind else list(KINDS)
        out = []
        for k in kinds:
            for name in sorted(self._entries[k]):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    out.append(self._entries[k][name])
        return out

    def get(self, kind: str, name: str) -> ComponentEntry:
        """Look a component up; unknown names raise :class:`VqkitError` with a suggestion."""
        if kind not in self._entries:
            raise VqkitError(f"unknown component kind {kind!r}" + suggest(kind, KINDS))
        try:
            return self._entries[kind][name]
        except KeyError:
            raise VqkitError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        msg = f"unknown {NOUNS[kind]} {name!r}" + suggest(str(name), self._entries[kind])
        broken = [p.name for p in self.plugins if p.status == "broken"]
        if broken:
            msg += f"; broken plugins not loaded: {', '.join(broken)} (see `vqkit plugins`)"
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
    def _add(self, entry: ComponentEntry) -> None:
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
        existing = self._entries[entry.kind].get(entry.name)
        if existing is not None:
            raise VqkitError(
                f"duplicate {NOUNS[entry.kind]} {entry.name!r}: registered by plugin "
                f"{existing.plugin!r} (distribution {existing.distribution}) and by plugin "
                f"{entry.plugin!r} (distribution {entry.distribution}); uninstall one or "
                f"block it with {DISABLE_ENV}={entry.plugin}"
            )
        self._entries[entry.kind][entry.name] = entry


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    # one entry per name: a distribution found twice on sys.path is listed twice
    unique: dict[tuple[str, str], md.EntryPoint] = {}
    for ep in eps:
        unique.setdefault((ep.name, ep.value), ep)
    return sorted(unique.values(), key=lambda e: e.name)


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

    def fail(info: PluginInfo, exc: BaseException, what: str) -> None:
        info.status = "broken"
        info.error = f"{type(exc).__name__}: {exc}"
        message = (
            f"plugin {info.name!r} (distribution {info.distribution}) {what}: {info.error}"
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
        if ep.name in blocked:
            info.status = "blocked"
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break vqkit
            fail(info, exc, "failed to import")
            continue
        try:
            pm.register(obj, name=ep.name)
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
                fail(info, exc, "implements an unknown hook")
                break
        else:  # pragma: no cover - pluggy always names the plugin
            raise

    for info, obj in loaded:
        _collect(pm, registry, info, obj, fail)
    return registry


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
        added = []
        for entry in staged:
            try:
                registry._add(entry)
            except Exception:
                for e in added:  # undo this plugin's partial registration
                    del registry._entries[e.kind][e.name]
                raise
            added.append(entry)
    except VqkitError:
        raise  # duplicates are always fatal: silently picking one hides bugs
    except Exception as exc:
        fail(info, exc, "raised while registering components")
        return
    for entry in staged:
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


