"""Reading YAML a user hands us, at a bounded cost.

PyYAML's safe loader builds only plain data, but its cost is unbounded: an alias bomb
(``&a [*b, *b, ...]`` nested a few levels) expands into billions of nodes once the data
is walked or copied, deep nesting overflows Python's stack (``RecursionError``), and a
huge file is parsed in full. Recipes are small, so vqkit reads them within fixed limits:

=====================  ==========================================================
``MAX_BYTES``          file size (checked before parsing, by a bounded read)
``MAX_DEPTH``          nesting depth of mappings and sequences
``MAX_NODES``          nodes after alias expansion (each alias counts as the size
                       of what it points to), so an alias bomb stops early
``MAX_ALIASES``        number of ``*alias`` uses
=====================  ==========================================================

An exceeded limit raises :class:`YamlLimitError`, a :class:`yaml.MarkedYAMLError` that
carries the line and column where it was hit, so callers report it like any YAML error.
Parsing uses libyaml's event parser when PyYAML has it (10-70x faster than the pure
Python scanner) and PyYAML's own composer with the counts added.
"""
from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.resolver import Resolver

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "MAX_ALIASES", "YamlLimitError", "read_text", "compose",
           "construct", "safe_load"]

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 5_000
MAX_ALIASES = 500


class YamlLimitError(yaml.MarkedYAMLError):
    """A limit of this module was exceeded (``problem`` says which, ``problem_mark`` where)."""


class _Start:
    """A stand-in mark for errors found before parsing (line 1, column 1)."""

    line = 0
    column = 0


class _BoundedComposer(Composer):
    """PyYAML's composer, counting depth, nodes (aliases expanded) and aliases."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._expanded = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}

    def _limit(self, what: str, event) -> YamlLimitError:
        return YamlLimitError(problem=f"recipe too large or too deep: {what}", problem_mark=event.start_mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise self._limit(f"more than {MAX_ALIASES} aliases", event)
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # `&a [*a]`: data that contains itself
                raise self._limit("an alias refers to a value that contains it", event)
            self._expanded += self._sizes[id(node)]
            if self._expanded > MAX_NODES:
                raise self._limit(f"more than {MAX_NODES} values once aliases are expanded", event)
            return node
        nested = isinstance(event, (MappingStartEvent, SequenceStartEvent))
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise self._limit(f"nested more than {MAX_DEPTH} levels deep", event)
        before = self._expanded
        self._expanded += 1
        if self._expanded > MAX_NODES:
            raise self._limit(f"more than {MAX_NODES} values", event)
        node = super().compose_node(parent, index)
        if nested:
            self._depth -= 1
        self._sizes[id(node)] = self._expanded - before
        return node


try:  # libyaml's event parser, PyYAML's composer and safe constructor
    from yaml._yaml import CParser as _Parser

    class _Loader(_BoundedComposer, _Parser, SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(Reader, Scanner, Parser, _BoundedComposer, SafeConstructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            _BoundedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


#: tags PyYAML's safe constructor knows that have no place in a recipe: ``!!binary`` gives
#: bytes (which pydantic turns into a string or a number, after the component names were
#: checked), ``!!set``/``!!omap``/``!!pairs`` non-JSON containers. They are refused like
#: ``!!python/...`` ("could not determine a constructor").
REFUSED_TAGS = tuple(f"tag:yaml.org,2002:{t}" for t in ("binary", "set", "omap", "pairs"))
_Loader.yaml_constructors = {tag: make for tag, make in SafeConstructor.yaml_constructors.items()
                             if tag not in REFUSED_TAGS}


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``, read at most ``MAX_BYTES + 1`` bytes far.

    Raises :class:`YamlLimitError` when the file is larger than ``MAX_BYTES`` (a special
    file such as ``/dev/zero`` is never read to its end), ``OSError`` or
    ``UnicodeDecodeError`` as :func:`open` does.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlLimitError(
            problem=f"recipe too large: more than {MAX_BYTES} bytes (recipes are small YAML files)",
            problem_mark=_Start(),
        )
    return data.decode("utf-8")


def compose(text: str) -> yaml.Node | None:
    """The node graph of the single YAML document in ``text`` (``None`` when empty),
    within the limits above."""
    if len(text) > MAX_BYTES:
        raise YamlLimitError(problem=f"recipe too large: more than {MAX_BYTES} characters",
                             problem_mark=_Start())
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def construct(node: yaml.Node) -> Any:
    """Plain Python data (dicts, lists, scalars) of a node from :func:`compose`."""
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` within the limits above."""
    node = compose(text)
    return None if node is None else construct(node)
