"""Sample quality of a trained prior against two references measured in the same run.

    python benchmarks/prior_quality.py PRIOR_RUN_DIR_OR_CHECKPOINT [--n 1000] [--seed 1]

Prints the Fréchet distance on VGG16 relu5_3 features (vqkit.metrics, as `vqkit eval`) of

* ``prior``: N samples of the prior (class-conditional: with the labels of the first N test
  images) against the autoencoder's reconstructions of the first N test images;
* ``floor``: reconstructions of N *other* test images against the same N reconstructions
  (two draws from the target distribution: the best any sampler can score at this N);
* ``independent``: each code drawn independently from its position's frequency in the
  train codes (per class when conditional), the prior without any context;

and the test bits per dimension of the prior against the independent model. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import math

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", help="prior run dir or checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args(argv)

    from vqkit.commands.train import resolve_checkpoint
    from vqkit.prior.codes import load_or_compute_codes
    from vqkit.prior.quality import feature_distance
    from vqkit.prior.sampling import draw, load_prior

    trained = load_prior(resolve_checkpoint(args.target))
    info = trained.state["autoencoder"]
    recipe = trained.recipe.model
    codes = load_or_compute_codes(info["checkpoint"], recipe.autoencoder.cache_dir, sha256=info["sha256"])
    n, k = args.n, codes.codebook_size
    if codes.test.shape[0] < 2 * n:
        raise SystemExit(f"need {2 * n} test images, the split has {codes.test.shape[0]}")
    conditional = trained.num_classes > 0
    labels = codes.test_labels[:n] if conditional else None
    ae = trained.autoencoder

    def decode(c: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([ae.decode_indices(c[i:i + args.batch_size]).float()
                              for i in range(0, c.shape[0], args.batch_size)])

    recon = decode(codes.test[:n])
    other = decode(codes.test[n:2 * n])
    _, samples = draw(trained, n, labels, seed=args.seed, batch_size=args.batch_size)

    # position-wise independent model (per class when conditional), add-one smoothed
    flat_train = codes.train.reshape(codes.train.shape[0], -1)
    groups = codes.train_labels if conditional else torch.zeros(flat_train.shape[0], dtype=torch.int64)
    n_groups = int(groups.max()) + 1
    counts = torch.ones(n_groups, flat_train.shape[1], k)
    for g in range(n_groups):
        sel = flat_train[groups == g]
        counts[g].scatter_add_(1, sel.T, torch.ones(sel.T.shape))
    probs = counts / counts.sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(args.seed)
    test_groups = labels if conditional else torch.zeros(n, dtype=torch.int64)
    p = probs[test_groups]  # (n, L, K)
    indep_codes = torch.multinomial(p.reshape(-1, k), 1, generator=gen).reshape(n, *codes.grid)
    indep = decode(indep_codes)

    flat_test = codes.test.reshape(codes.test.shape[0], -1)
    all_groups = codes.test_labels if conditional else torch.zeros(flat_test.shape[0], dtype=torch.int64)
    indep_bpd = float(-probs[all_groups].gather(2, flat_test[..., None]).log().mean()) / math.log(2)
    with torch.no_grad():
        nll = 0.0
        for i in range(0, flat_test.shape[0], args.batch_size):
            lab = codes.test_labels[i:i + args.batch_size] if conditional else None
            logits = trained.prior(flat_test[i:i + args.batch_size], lab)
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, k), flat_test[i:i + args.batch_size].reshape(-1), reduction="sum"))
    prior_bpd = nll / flat_test.numel() / math.log(2)
    print(json.dumps({
        "n": n,
        "fd_prior_vs_recon": round(feature_distance(samples, recon), 3),
        "fd_floor_other_recon_vs_recon": round(feature_distance(other, recon), 3),
        "fd_independent_vs_recon": round(feature_distance(indep, recon), 3),
        "test_bpd_prior": round(prior_bpd, 4),
        "test_bpd_independent": round(indep_bpd, 4),
        "test_grids": int(flat_test.shape[0]),
    }))


if __name__ == "__main__":
    main()
