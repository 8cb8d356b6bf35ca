"""Fake installed distributions for testing entry-point loading."""
from __future__ import annotations

import contextlib
import importlib
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Mapping


@contextlib.contextmanager
def install_fake_distribution(
    root: Path,
    name: str,
    version: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    group: str = "vqkit",
) -> Iterator[Path]:
    """Write ``modules`` (module name -> source) and a ``NAME-VERSION.dist-info`` whose
    ``entry_points.txt`` declares ``entry_points`` (entry name -> ``module[:attr]``) in
    ``group``, put ``root`` on ``sys.path`` for the duration, then clean up."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        path = root / (module.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    info.joinpath("entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for module in modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()
