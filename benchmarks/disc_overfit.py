"""Does the study's discriminator generalise? Its loss and accuracy on training crops
against held-out crops, per run, at the final checkpoint.

For each named run of the loss study's store (``benchmarks/perceptual_study.py --long``),
the final checkpoint's autoencoder reconstructs ``--n`` crops of the training split and
``--n`` crops of the test split (the recipe's own data, held-out photographs), and its
discriminator judges real crops against those reconstructions as in a training step
(train mode, batches of the recipe's batch size, real and fake in separate forward
passes, no gradient). Printed per run and split: the hinge loss (½(E relu(1−D(x)) +
E relu(1+D(x̂)))), the mean logits on real and fake crops, and the share of patch logits
on the right side of 0. A discriminator that has memorised its training photographs has a
low loss on the training split and a high one on the held-out split; LeCam and R1
(``discriminator.lecam``, ``discriminator.r1``) are meant to narrow that gap.

    python benchmarks/disc_overfit.py --work /work/study15long long-disc-features-tuned long-tuned-lecam0.3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def judge(run_dir: Path, n: int) -> dict[str, dict[str, float]]:
    import torch

    from vqkit import gan
    from vqkit.recipe import recipe_from_dict
    from vqkit.train.build import build_all
    from vqkit.train.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    recipe = recipe_from_dict(state["recipe"])
    built = build_all(recipe, check=False)
    model, disc = built.model, built.discriminator
    model.load_state_dict(state["model"])
    disc.load_state_dict(state["discriminator"])
    model.eval()
    disc.train()  # as in a training step (matters only for a discriminator with BatchNorm; the PatchGAN uses group norm)
    bs = recipe.model.train.batch_size
    out = {}
    for split, data in (("train", built.train_data), ("held-out", built.test_data)):
        idx = torch.linspace(0, len(data) - 1, n).round().long()
        real_logits, fake_logits = [], []
        with torch.no_grad():
            for i in range(0, n, bs):
                x = torch.stack([data[int(j)] for j in idx[i:i + bs]])
                recon = model(x)[0].float()
                real_logits.append(disc(x).float().flatten())
                fake_logits.append(disc(recon).float().flatten())
        lr, lf = torch.cat(real_logits), torch.cat(fake_logits)
        out[split] = {
            "hinge": float(gan.hinge_d_loss(lr, lf)),
            "logit_real": float(lr.mean()), "logit_fake": float(lf.mean()),
            "accuracy": float(((lr > 0).float().mean() + (lf < 0).float().mean()) / 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from perceptual_study import find_run

    from vqkit.tracking import find_run_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run names in the study's experiment")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-perceptual", help="the study's store and run dirs")
    p.add_argument("--experiment", default="perceptual-long")
    p.add_argument("--n", type=int, default=256, help="crops per split")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    uri = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    print("| run | split | D hinge loss | mean logit real | mean logit fake | patch accuracy |")
    print("|---|---|---|---|---|---|")
    for name in args.runs:
        run = find_run(uri, name, args.experiment)
        if run is None:
            print(f"| {name} | no run | | | | |")
            continue
        for split, r in judge(find_run_dir(run["run_id"], [args.work / "runs"]), args.n).items():
            print(f"| {name} | {split} | {r['hinge']:.3f} | {r['logit_real']:+.2f} | {r['logit_fake']:+.2f} | "
                  f"{100 * r['accuracy']:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
