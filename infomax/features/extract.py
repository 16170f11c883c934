"""Frozen-encoder features of a labelled split, in dataset order: the kNN monitor during pretraining,
and every probe of the eval stage (decoded images or a .beton).

Several processes each encode their shard; :func:`gather_rows` collects every process's rows with
the dataset position of each, and :func:`in_dataset_order` puts them back in order, each image once
(a sharded loader repeats a few images to even out the processes). Both loaders use that one path.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from infomax.data import ImageDataset, build_eval_transform
from infomax.data.multiview import load_readable
from infomax.features.knn import knn_predict
from infomax.method.online_probe import probe_accuracy
from infomax.runtime.device import send

InputFn = Callable[[torch.Tensor], torch.Tensor]


UNREADABLE = -1  # the label of an image that cannot be decoded: its row is dropped from the features


class ImageListDataset(torch.utils.data.Dataset):
    """An ImageDataset seen through the deterministic eval transform (kNN monitor, eval stage),
    normalised with ``mean``/``std`` (an export's own; default: the dataset's). Items: (image, label); an
    unreadable image comes as its next readable neighbour labelled ``UNREADABLE`` (batches keep their shape),
    and :func:`extract_features` drops it: nothing scores or votes twice."""

    def __init__(self, base: ImageDataset, size: int, crop_ratio: float = 1.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.base = base
        self.transform = build_eval_transform(size, mean or base.mean, std or base.std, crop_ratio)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label, failed = load_readable(self.base, i)
        return self.transform(image), UNREADABLE if failed else label

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A DataLoader batch at once. In-memory datasets (``ImageDataset.load_many``) are transformed
        as one B x C x H x W tensor instead of image by image; the others item by item."""
        loaded = self.base.load_many(indices)
        if loaded is None:
            return [self[i] for i in indices]
        images, labels = loaded
        return list(zip(self.transform(images).unbind(0), labels.tolist()))


class _WithPosition(torch.utils.data.Dataset):
    """(image, label) items -> (image, label, position), so rows can be put back in order after sharding."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        return (*self.base[i], i)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any, int]]:
        batched = hasattr(self.base, "__getitems__")
        items = self.base.__getitems__(indices) if batched else [self.base[i] for i in indices]
        return [(*item, i) for item, i in zip(items, indices)]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def gather_rows(accelerator: Accelerator, feats: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every process's rows of one batch (B_r x F, B_r, B_r dataset positions, on the device) on every process.

    The processes may hold different counts (a short last batch): each pads its batch to ``rows``, the
    loader's batch size that every rank knows, with position -1 (:func:`in_dataset_order` drops those). No
    rank asks the others for their sizes, so a batch costs one gather and no read back to the host."""
    if accelerator.num_processes == 1:
        return feats, labels, positions
    pad = rows - feats.shape[0]
    if pad > 0:
        feats = torch.cat([feats, feats.new_zeros(pad, *feats.shape[1:])])
        labels = torch.cat([labels, labels.new_zeros(pad)])
        positions = torch.cat([positions, positions.new_full((pad,), -1)])
    return accelerator.gather((feats, labels, positions))


def in_dataset_order(feats: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                     count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with their dataset positions -> (count x F, count) in dataset order. A repeated position
    holds the same image's features again, so keeping either copy is right; position -1 is padding
    (:func:`gather_rows`), written to a spare row that is cut off; a missing position is a bug."""
    out = feats.new_empty(count + 1, feats.shape[1])
    out_labels = labels.new_empty(count + 1, dtype=torch.long)
    seen = positions.new_zeros(count + 1, dtype=torch.bool)
    where = torch.where(positions >= 0, positions, count)  # no boolean index: its length would be read back
    out[where], out_labels[where], seen[where] = feats, labels.long(), True
    if not bool(seen[:count].all()):
        raise RuntimeError(f"feature extraction lost {int((~seen[:count]).sum())} of {count} images")
    return out[:count], out_labels[:count]


# What a feature loader's worker imports: once in the fork server, not in each worker.
WORKER_PRELOAD = ["torch", __name__, "infomax.data.beton_file"]


def worker_context() -> Any:
    """Where the feature loader's workers start: forked, as torch's default, unless this process has imported
    numba (FFCV's loader). Forked while numba's thread pool decodes, each worker made TBB print "Unable to join
    threads to shut down before fork()" (four lines a rank at a kNN pass), and a child running numba's parallel
    code could hang. A fork server is a fresh interpreter, so its workers start clean; each is sent its dataset
    pickled (a :class:`infomax.data.datasets.Subset` sends its own rows alone)."""
    if "numba" not in sys.modules:
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)  # the process's one server takes the list of whoever starts it
    return ctx


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: torch.utils.data.Dataset, accelerator: Accelerator,
                     batch_size: int = 256, num_workers: int = 0, input_fn: InputFn = lambda x: x,
                     shard: bool = False, keep_shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N x F, fp32, CPU) and labels (N) of a labelled dataset of (image, label), in eval mode, less the
    items labelled ``UNREADABLE`` (N counts the readable ones).

    ``input_fn`` maps a device batch to the encoder's input (e.g. the L channel of Lab for CMC).
    With ``shard`` every process computes its shard and all receive the whole split, each image
    once whatever the process count. With ``keep_shard`` each process returns only its own disjoint
    share (every W-th image from its rank; N_r x F and N_r labels) *on the device*: a kNN bank that stays
    split (:func:`infomax.features.knn.sharded_knn_predict_many`), whose candidates cross ranks in collectives that
    take device tensors only (NCCL). With neither the calling process computes everything alone.
    """
    if keep_shard:
        rank, world = accelerator.process_index, accelerator.num_processes
        dataset, shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)), False
    keep = (lambda t: t) if keep_shard else (lambda t: t.cpu())  # a split bank stays on the device
    loader = torch.utils.data.DataLoader(_WithPosition(dataset), batch_size=batch_size, num_workers=num_workers,
                                         multiprocessing_context=worker_context() if num_workers else None)
    if shard:
        loader = accelerator.prepare_data_loader(loader)
    feats, labels, positions = [], [], []
    with eval_mode(encoder):
        for x, y, i in loader:
            with accelerator.autocast():
                out = encoder(input_fn(send(x, accelerator.device))).float()
            rows = (out, send(y, accelerator.device), send(i, accelerator.device))
            for kept, part in zip(gather_rows(accelerator, *rows, batch_size) if shard else rows,
                                   (feats, labels, positions)):
                part.append(keep(kept))
    if keep_shard:  # the Subset's loader keeps its order: no positions to sort by
        return readable_rows(torch.cat(feats), torch.cat(labels).long())
    return readable_rows(*in_dataset_order(torch.cat(feats), torch.cat(labels), torch.cat(positions), len(dataset)))


def readable_rows(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x F, N) less the rows of unreadable images (label ``UNREADABLE``)."""
    readable = labels != UNREADABLE
    if bool(readable.all()):  # one read back per split, outside any training step
        return feats, labels
    return feats[readable], labels[readable]


@torch.no_grad()
def beton_features(encoder: nn.Module, path: str, size: int, crop_ratio: float, batch_size: int,
                   accelerator: Accelerator, num_workers: int = 1, input_fn: InputFn = lambda x: x,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   keep_shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder features (N x F, CPU) and labels (N) of every image of a .beton, in file order
    (``keep_shard``: this process's own share only, each image on one rank, on the device, as
    :func:`extract_features`).

    Centre crop ``crop_ratio`` of the short side resized to ``size`` (FFCV's decoder), normalised in
    torch with ``mean``/``std`` (default: the .beton's own). Several processes each read the shard
    FFCV's ``distributed`` order gives them (positions r, r + W, ..., the first ones repeated to
    even the shards), gathered as :func:`extract_features` does.
    """
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage
    from torchvision.transforms import v2

    from infomax.data.beton_file import BetonInfo, require_ffcv

    require_ffcv()
    info = BetonInfo(path)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    distributed=world > 1, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((size, size), ratio=crop_ratio), ToTensor(),
                                         ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean or info.mean),
                                                                               list(std or info.std))])
    raw = send(torch.arange(-(-info.count // world) * world)[rank::world], accelerator.device)
    shard = raw % info.count  # this rank's positions, in order
    feats, labels, positions, done = [], [], [], 0
    with eval_mode(encoder):
        for image, label in loader:
            x = normalise(send(image[:, : info.channels], accelerator.device))
            with accelerator.autocast():
                out = encoder(input_fn(x)).float()
            where = shard[done : done + len(out)]
            done += len(out)
            if keep_shard:  # drop the repeats that even the shards: each image stays on one rank
                own = raw[done - len(out) : done] < info.count
                feats.append(out[own])
                labels.append(send(label, accelerator.device)[own].long())
                continue
            rows = gather_rows(accelerator, out, send(label, accelerator.device).long(), where, batch_size)
            for kept, part in zip(rows, (feats, labels, positions)):
                part.append(kept.cpu())
    if keep_shard:
        return torch.cat(feats), torch.cat(labels)
    return in_dataset_order(torch.cat(feats), torch.cat(labels), torch.cat(positions), info.count)


def knn_monitor(encoder: nn.Module, bank: torch.utils.data.Dataset, queries: torch.utils.data.Dataset,
                accelerator: Accelerator, k: int, temperature: float, num_workers: int,
                input_fn: InputFn = lambda x: x, probe: nn.Module | None = None) -> tuple[float, float | None]:
    """Top-1 of a weighted kNN classifier on frozen features (monitoring, not eval), and the online
    probe's top-1 on the same held-out queries (None without a probe).

    Called by every process: each extracts its shard of the bank and the queries and all receive the
    whole sets, so W ranks share the pass instead of W - 1 of them waiting in a collective while rank 0
    does it alone (on a slow node that wait can outlast the process group's timeout). Every rank then
    scores the same kNN."""
    fb, lb = extract_features(encoder, bank, accelerator, num_workers=num_workers, input_fn=input_fn, shard=True)
    fq, lq = extract_features(encoder, queries, accelerator, num_workers=num_workers, input_fn=input_fn, shard=True)
    num_classes = int(max(lb.max(), lq.max())) + 1
    pred = knn_predict(fb, lb, fq, k, temperature, num_classes)
    return (pred == lq).float().mean().item(), probe_accuracy(probe, fq, lq) if probe is not None else None
