"""Why an export's kNN reads what it reads: the geometry of its frozen features, a diagnostic (not a protocol).

    .venv/bin/python benchmarks/studies/feature_geometry.py --weights runs/fmnist_cpu/export

Extracts the eval stage's train and test features (configs/probe_fmnist.yaml: precision, channels_last,
the export's normalisation) and prints kNN k=20 as the eval stage scores it (cosine, temperature-weighted
votes), then the same kNN on features centred on the train mean and on standardised features, the
share of variance in the top principal directions and the effective rank (sum(ev)^2 / sum(ev^2)).
With ``--precise-bn N`` it also recomputes the encoder's BatchNorm statistics on N un-augmented train
images (no labels) before extracting: how far training-view statistics are from clean images'.

A large gain from centring alone says one mean direction dominates the cosine between images; the
eval stage does not centre (as DINO's and solo-learn's kNN do not), so that gain is for recipes to earn.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from infomax.config.eval import EvalConfig, validate_eval
from infomax.config.pretrain import load_config
from infomax.data.datasets import open_dataset, stratified_subset
from infomax.eval.rows import norm_of
from infomax.export.encoder import load_encoder
from infomax.features.extract import ImageListDataset, extract_features
from infomax.features.knn import knn_predict_many
from infomax.runtime.distributed import make_accelerator


@torch.no_grad()
def recompute_batchnorm(encoder: nn.Module, images: torch.utils.data.Dataset, accelerator, batch_size: int) -> None:
    """Population BN statistics of ``encoder`` over ``images`` (cumulative average, as precise BN), in place."""
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over all batches
    encoder.train()
    for x, _ in torch.utils.data.DataLoader(images, batch_size=batch_size):
        with accelerator.autocast():
            encoder(x.to(accelerator.device, memory_format=torch.channels_last))
    encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="an export directory, e.g. runs/fmnist_cpu/export")
    parser.add_argument("--precise-bn", type=int, default=0, metavar="N",
                        help="also recompute BN statistics on N evenly spaced un-augmented train images")
    args = parser.parse_args()
    cfg = load_config("configs/probe_fmnist.yaml", [f"weights=[{args.weights}]"], schema=EvalConfig, check=validate_eval)
    train, test = open_dataset(cfg.dataset, "train", cfg.root), open_dataset(cfg.dataset, "test", cfg.root)
    accelerator, _ = make_accelerator(0, cfg.precision)
    k, t = cfg.knn_k[0] if cfg.knn_k else 20, cfg.knn_temperature
    for n_bn in sorted({0, args.precise_bn}):
        name = f"BN statistics of {n_bn} clean train images" if n_bn else "as exported"
        encoder, meta = load_encoder(args.weights)
        if meta.get("input_transform", "normalise") != "normalise":
            raise SystemExit(f"error: {args.weights} takes {meta['input_transform']} inputs; this diagnostic feeds "
                             "the images as they are, so it measures single-input encoders only")
        encoder = encoder.to(accelerator.device, memory_format=torch.channels_last).eval()  # as the eval stage runs it
        size, norm = meta["input_size"][-1], norm_of(meta)
        views = [ImageListDataset(split, size, cfg.center_crop_ratio, *norm) for split in (train, test)]
        if n_bn:
            recompute_batchnorm(encoder, stratified_subset(views[0], n_bn), accelerator, cfg.batch_size_per_process)
        (x, y), (tx, ty) = (extract_features(encoder, v, accelerator, cfg.batch_size_per_process) for v in views)

        def knn(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor = y, ty: torch.Tensor = ty) -> float:
            return 100 * (knn_predict_many(a, y, b, [k], t, train.num_classes)[k] == ty).float().mean().item()

        mean, std = x.mean(0), x.std(0) + 1e-6
        ev = torch.linalg.eigvalsh(torch.cov((x - mean).T.double())).flip(0).clamp_min(0)
        share = (ev / ev.sum())[:3].tolist()
        print(f"{name}: kNN k={k} {knn(x, tx):.2f} | centred {knn(x - mean, tx - mean):.2f} | standardised "
              f"{knn((x - mean) / std, (tx - mean) / std):.2f} | variance in the top 3 directions "
              f"{', '.join(f'{100 * s:.1f}%' for s in share)} | effective rank "
              f"{(ev.sum() ** 2 / (ev ** 2).sum()).item():.1f} "
              f"of {x.shape[1]}", flush=True)


if __name__ == "__main__":
    main()
