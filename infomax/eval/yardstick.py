"""One MI yardstick for any export: the same estimator, trained afresh, on the same kind of held-out view pairs.

Each pretraining run reports its own bound, on its own critic and encoder, so two runs' values are different
quantities (an NWJ value against an InfoNCE one, a cosine critic capped at 1/temperature against a learned one).
This measures every export alike:

1. the encoder frozen; two independent views of each image (the run's own view recipes, from its config.yaml);
2. features of both views, each projected on the training pairs' top 64 principal components and whitened;
3. a fresh critic f(a, b) = a'Wb + a'diag(u)a + b'diag(v)b + c (bilinear, with the quadratic and constant terms
   of a Gaussian log density ratio; InfoNCE ignores the a-only ones) trained on training pairs with InfoNCE at K
   candidates, and a second one with NWJ, each kept as it was at its best on a tenth of the training pairs held
   out of its fit (early stopping);
4. both bounds on held-out pairs (the run's data.holdout images, else the test split: images neither the
   encoder nor the critics saw), mean and standard error over batches of K.

``python -m infomax.eval.yardstick RUN/export`` writes RUN/yardstick.json and prints one line. Tests:
tests/test_eval.py (``yardstick``): on Gaussian features with a closed-form MI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from infomax.method import bounds

# 2: the critics stop early on a tenth of the training pairs (version 1 trained them to their last step); a study
# rereads a yardstick.json of another version
VERSION = 2


class QuadraticCritic(nn.Module):
    """f(a, b) = a'Wb + a'diag(u)a + b'diag(v)b + c for every pair of rows: B x D and K x D features -> B x K scores.
    On standardised features with independent coordinates the Gaussian log density ratio has this form; InfoNCE
    ignores the a-only terms, NWJ needs every one. Diagonal quadratics keep the critic from fitting the training
    pairs' noise with D^2 more parameters a side."""

    def __init__(self, dim_a: int, dim_b: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim_a, dim_b))
        self.u = nn.Parameter(torch.zeros(dim_a))
        self.v = nn.Parameter(torch.zeros(dim_b))
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ self.w @ b.T + (a * a @ self.u)[:, None] + (b * b @ self.v)[None, :] + self.c


def fit_critic(train_a: torch.Tensor, train_b: torch.Tensor, bound: str, k: int, steps: int, lr: float,
               seed: int, check_every: int = 25) -> tuple[QuadraticCritic, int]:
    """A fresh critic trained to maximise ``bound`` (infonce | nwj) on batches of ``k`` training pairs (N x D each),
    and the step it was kept at.

    A tenth of the pairs (``k`` at least) is kept out of the fit, and the critic as it was at its best value there
    (checked every ``check_every`` steps) is the one returned: NWJ's critic otherwise goes on fitting the training
    pairs until e^f of an unseen negative pair overflows. With too few pairs for that, the last step's critic."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_a), generator=g)
    n_check = max(k, len(train_a) // 10)
    n_check = n_check if len(train_a) - n_check >= k else 0
    check, fit = order[:n_check], order[n_check:]
    critic = QuadraticCritic(train_a.shape[1], train_b.shape[1])
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    fn = {"infonce": bounds.infonce, "nwj": bounds.nwj}[bound]
    best, best_state, best_step = -math.inf, None, steps
    for step in range(steps + 1):
        if n_check and (step % check_every == 0 or step == steps):
            value = batch_values(critic, train_a[check], train_b[check], bound, k).mean().item()
            if math.isfinite(value) and value > best:
                best, best_step = value, step
                best_state = {n: p.detach().clone() for n, p in critic.state_dict().items()}
        if step == steps:
            break
        rows = fit[torch.randperm(len(fit), generator=g)[:k]]
        loss = -fn(critic(train_a[rows], train_b[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if best_state is not None:
        critic.load_state_dict(best_state)
    return critic, best_step


@torch.no_grad()
def batch_values(critic: QuadraticCritic, a: torch.Tensor, b: torch.Tensor, bound: str, k: int) -> torch.Tensor:
    """The bound on each whole batch of ``k`` consecutive pairs (the last partial one dropped)."""
    fn = {"infonce": bounds.infonce, "nwj": bounds.nwj}[bound]
    return torch.stack([fn(critic(a[i:i + k], b[i:i + k])) for i in range(0, len(a) - k + 1, k)])


def whitened(train: torch.Tensor, val: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both projected on the training features' top ``dim`` principal components and whitened there (unit variance
    each), then held to +-8: a critic on an encoder's 1024 or 2048 raw features has D^2 weights to fit the training
    pairs' noise with (its InfoNCE on held-out pairs read -100 nats), and a direction that barely varied on the
    training images would reach scores whose exponential (NWJ's negatives) overflows on one held-out image."""
    mean = train.mean(0)
    _, s, v = torch.linalg.svd(train - mean, full_matrices=False)
    keep = min(dim, int((s > 1e-4 * s[0]).sum()))
    basis = v[:keep].T / (s[:keep] / math.sqrt(len(train) - 1))  # D x keep: projection and whitening in one
    return tuple(((x - mean) @ basis).clamp(-8, 8) for x in (train, val))


def yardstick(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], k: int = 512,
              steps: int = 400, lr: float = 0.01, seed: int = 0, dim: int = 64) -> dict[str, Any]:
    """InfoNCE (at ``k`` candidates, ceiling log k) and NWJ of fresh critics trained on ``train`` pairs (N x D each)
    and read on ``val`` pairs (M x D each, M >= 20 k for 20 batches), each side on its top ``dim`` whitened principal
    components: {bound: {nats, se, batches}}, plus log_k."""
    (ta, tb), (va, vb) = train, val
    if len(va) < 20 * k:
        raise ValueError(f"the yardstick reads at least 20 batches of {k} validation pairs; got {len(va)} pairs")
    ta, va = whitened(ta, va, dim)
    tb, vb = whitened(tb, vb, dim)
    out: dict[str, Any] = {"version": VERSION, "k": k, "log_k": math.log(k), "train_pairs": len(ta),
                           "validation_pairs": len(va), "dims": [ta.shape[1], tb.shape[1]]}
    # batches of held-out pairs in a fixed random order: a class-sorted folder's consecutive images are few classes
    order = torch.randperm(len(va), generator=torch.Generator().manual_seed(seed + 1))
    va, vb = va[order], vb[order]
    for bound in ("infonce", "nwj"):
        critic, kept_at = fit_critic(ta, tb, bound, k, steps, lr, seed)
        values = batch_values(critic, va, vb, bound, k)
        mean, se = values.mean().item(), (values.std() / math.sqrt(len(values))).item()
        # NWJ's e^f on negatives can overflow where its critic overfit its training pairs: said, not averaged in.
        # A critic kept at its zero start (kept_at_step 0) reads a valid but empty bound (InfoNCE 0, NWJ -1/e).
        out[bound] = {"nats": mean if math.isfinite(mean) else None, "se": se if math.isfinite(se) else None,
                      "batches": len(values), "kept_at_step": kept_at}
    return out


@torch.no_grad()
def view_pair_features(export: str | Path, images: Any, cfg: Any, draws: int = 1,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (draws N x F each) of two independent views of every image of ``images``, drawn ``draws``
    times with the run's own first and last view recipes (``cfg``: its config; BYOL's asymmetric pair: both), through
    the export's input transform. Same-size images are cut per batch (``BatchViews``, as data.augment=batch trains),
    others per image."""
    from infomax.data.batch_views import BatchViews
    from infomax.data.multiview import MultiViewDataset
    from infomax.data.transforms import build_view_transform
    from infomax.eval.rows import input_fn_for
    from infomax.export.encoder import load_encoder
    from infomax.runtime.tracking import progress_bar

    encoder, meta = load_encoder(export)
    views, seed = [cfg.data.views[0], cfg.data.views[-1]], cfg.run.seed + 1  # not the pretraining's own draws
    per_batch = BatchViews(views, meta["mean"], meta["std"], seed) if images.same_size else None
    transforms = [] if per_batch else [build_view_transform(v, images.channels, meta["mean"], meta["std"])
                                       for v in views]
    pairs = MultiViewDataset(images, transforms, seed=seed)
    input_fn, feats = input_fn_for(meta), ([], [])
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size)
    with progress_bar(total=draws * len(loader), desc="yardstick features") as bar:
        for draw in range(draws):
            pairs.set_epoch(draw)
            for step, batch in enumerate(loader):
                two = per_batch(batch["views"][0], draw, step) if per_batch else batch["views"]
                for part, view in zip(feats, two):
                    part.append(encoder(input_fn(view)).float())
                bar.update()
    return torch.cat(feats[0]), torch.cat(feats[1])


def main(argv: Sequence[str] | None = None) -> int:
    from infomax.config.pretrain import ConfigError, from_yaml
    from infomax.data.datasets import DataError, holdout_split, open_configured, stratified_subset
    from infomax.export.encoder import export_dir_of, read_meta
    from infomax.runtime.files import write_atomically

    p = argparse.ArgumentParser(description="One MI yardstick for an export: fresh InfoNCE and NWJ critics on "
                                            "held-out pairs of views of its frozen features.")
    p.add_argument("export", help="an export directory (RUN/export); its run's config.yaml gives the data and views")
    p.add_argument("--k", type=int, default=512, help="candidates per InfoNCE batch (its ceiling is log k)")
    p.add_argument("--train-pairs", type=int, default=20480, help="training images (one pair each) for the critics")
    p.add_argument("--draws", type=int, default=2, help="pairs of views drawn from each held-out image "
                                                        "(Fashion-MNIST's 10k test images x 2: 39 batches of 512)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps per critic")
    args = p.parse_args(argv)
    try:
        meta = read_meta(args.export)
        run_dir = export_dir_of(args.export).parent
        cfg = from_yaml((run_dir / "config.yaml").read_text().partition("\n")[2])
        train = open_configured(cfg.data, "train", cfg.run.seed)
        if cfg.data.holdout:  # the run's own validation images: a study reads them, the test split stays unread
            train, held = holdout_split(train, cfg.data.holdout)
        else:
            held = open_configured(cfg.data, "test", cfg.run.seed)  # images the pretraining never trained on
        train = stratified_subset(train, args.train_pairs)
        result = yardstick(view_pair_features(args.export, train, cfg),
                           view_pair_features(args.export, held, cfg, draws=args.draws), k=args.k, steps=args.steps)
    except (ConfigError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(export=str(args.export), sha256=meta["sha256"], dataset=cfg.data.dataset)
    write_atomically(run_dir / "yardstick.json", json.dumps(result, indent=2) + "\n")
    def reading(r: dict) -> str:
        if r["nats"] is None:
            return "diverged (its critic overfit the training pairs)"
        return f"{r['nats']:.3f} ± {r['se']:.3f} nats" + (
            " (its critic never beat its zero start on held-out training pairs: a valid but empty bound)"
            if r["kept_at_step"] == 0 else "")

    said = {b: reading(result[b]) for b in ("infonce", "nwj")}
    print(f"yardstick of {args.export}: InfoNCE {said['infonce']} (K={args.k}, ceiling {result['log_k']:.2f}), NWJ "
          f"{said['nwj']}, over {result['infonce']['batches']} batches of held-out view pairs of {cfg.data.dataset}; "
          f"{run_dir / 'yardstick.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
