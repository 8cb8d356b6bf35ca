"""The quantizers of docs/quantizers.md alone: forward + backward time, as ratios to vq's.

The comparison itself (PSNR, SSIM, code usage, step time of whole trainings) is one
``vqkit sweep`` per data set over the recipes in ``recipes/quantizers/``; a training step
is mostly encoder, decoder and loss, so this script times what differs between the
children, the quantizer, on its own. It plans each recipe's sweep as ``vqkit sweep`` does
(nothing is listed twice), builds every child's quantizer on the recipe's latent shape and
times forward and backward on one random batch, the quantizers interleaved round
by round so that a change of machine load hits every one alike::

    python benchmarks/quantizers.py                       # both recipes, 100 rounds, 1 thread
    python benchmarks/quantizers.py --rounds 20 --recipes recipes/quantizers/fashion-mnist.yaml

Needs both plugin distributions installed (``make setup`` does it). Prints one table per
recipe: the minimum (the run least disturbed by other processes) and the median time per
quantizer and their ratios to the first one of the grid (``vq``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["recipes/quantizers/fashion-mnist.yaml", "recipes/quantizers/natural-patches.yaml"]


def quantizers_of(recipe_path: str) -> tuple[dict, tuple[int, int, int]]:
    """``{child name: quantizer module}`` of the sweep's children (their recipes exactly as
    ``vqkit sweep`` trains them, so the names are the runs' names) and the latent shape
    ``(D, h, w)`` of one image."""
    from vqkit.plugins import get_registry
    from vqkit.sweep import plan_sweep

    plan = plan_sweep(recipe_path)
    out, shape = {}, None
    for child, recipe in zip(plan.children, plan.recipes):
        size = recipe.params_of("data").image_size
        h, w = (size, size) if isinstance(size, int) else size
        enc = recipe.params_of("encoder")
        shape = (enc.latent_dim, h // enc.factor, w // enc.factor)
        entry = get_registry().get("quantizers", recipe.model.quantizer.name)
        out[child.name] = entry.cls(recipe.params_of("quantizer"), dim=enc.latent_dim).train()
    return out, shape


def time_quantizers(recipe_path: str, rounds: int, threads: int, batch: int) -> str:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    quantizers, shape = quantizers_of(recipe_path)
    z = torch.randn(batch, *shape)
    times: dict[str, list[float]] = {name: [] for name in quantizers}
    for rnd in range(rounds + 3):
        for name, q in quantizers.items():
            x = z.clone().requires_grad_(True)
            t0 = time.perf_counter()
            out = q(x)
            weights = q.loss_weights()
            total = out.quantized.square().mean() + sum(weights.get(k, 1.0) * v for k, v in out.losses.items())
            total.backward()
            if rnd >= 3:  # 3 warm-up rounds
                times[name].append(time.perf_counter() - t0)
    names = list(quantizers)
    ref = names[0]
    base_min, base_med = min(times[ref]), statistics.median(times[ref])
    lines = [f"{recipe_path}: quantizer alone, forward + backward on {tuple(z.shape)} latents, "
             f"{rounds} interleaved rounds, {threads} thread(s); ratios to {ref!r}",
             "| child | min ms | min ratio | median ms | median ratio |", "|---|---|---|---|---|"]
    for name in names:
        lo, med = min(times[name]), statistics.median(times[name])
        lines.append(f"| {name} | {1000 * lo:.2f} | {lo / base_min:.2f} | {1000 * med:.2f} | {med / base_med:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated sweep recipes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds (after 3 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=64, help="images per batch of latents")
    args = ap.parse_args(argv)
    for recipe in [r for r in args.recipes.split(",") if r]:
        path = Path(recipe) if Path(recipe).is_absolute() else ROOT / recipe
        print(time_quantizers(str(path), args.rounds, args.threads, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
