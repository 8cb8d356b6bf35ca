"""Compare the per-rank state files a distributed run wrote with VQKIT_DEBUG_STATE_DIR set.

    python scripts/compare_rank_dumps.py DIR

For every dump (``reset-step<N>`` after each code-book reset, ``end`` after the last step)
prints whether every rank's model (code-book included) and discriminator tensors are
bit-identical to rank 0's; exits 1 if any differ or nothing was dumped.
"""
from __future__ import annotations

import pathlib
import sys

import torch


def main(folder: str) -> int:
    d = pathlib.Path(folder)
    files = sorted(d.glob("*-rank*.pt"))
    tags = sorted({p.name.rsplit("-rank", 1)[0] for p in files})
    ranks = sorted({int(p.stem.rsplit("-rank", 1)[1]) for p in files})
    if not tags or len(ranks) < 2:
        print(f"no per-rank dumps of 2 or more ranks in {d}")
        return 1
    failed = False
    for tag in tags:
        states = [torch.load(d / f"{tag}-rank{r}.pt", weights_only=True, map_location="cpu") for r in ranks]
        bad = sorted({f"{part}.{key}" for s in states[1:] for part in ("model", "discriminator")
                      for key, value in states[0][part].items() if not torch.equal(value, s[part][key])})
        failed |= bool(bad)
        print(f"{tag}: " + ("identical on ranks " + ",".join(map(str, ranks)) if not bad else f"DIFFER: {', '.join(bad[:8])}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
