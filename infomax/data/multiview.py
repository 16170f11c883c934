"""V augmented views per image, with augmentation randomness that is a pure function of
(seed, epoch, index) and with unreadable images skipped and reported."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from infomax.data.datasets import ImageDataset, next_readable


def load_readable(base: ImageDataset, index: int) -> tuple[torch.Tensor, int, list[str]]:
    """Image ``index``, or the next readable one after it; also the paths that failed on the way."""
    image, label, failures = next_readable(base, index)
    return image, label, [e.path for e in failures]


class MultiViewDataset(torch.utils.data.Dataset):
    """Wraps an ImageDataset; item i -> dict(views=[V x (C x H x W)], label, index, skipped).

    Each item seeds torch's RNG from (seed, epoch, index) inside ``fork_rng``: the augmentations
    do not depend on worker count, worker seeding or how many batches ran before, which is what
    makes a resumed run draw exactly the views the uninterrupted run would have drawn.

    An unreadable image is replaced by the next readable one (so batches keep their size, which
    the cross-rank gather needs) and its path is returned in ``skipped`` to be counted and reported.
    No transforms: one view, the image as loaded (uint8; ``data.augment=batch`` draws the views per
    batch on the device), with no per-image seeding.

    The epoch lives in shared memory: a DataLoader's persistent workers hold copies of the dataset made
    when they started, and must still see each later ``set_epoch``, or every epoch would redraw the first.
    """

    def __init__(self, base: ImageDataset, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 seed: int) -> None:
        self.base, self.transforms, self.seed = base, list(transforms), seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Seeds the next epoch's draws; takes effect in workers already running (called before the
        loader's next ``iter``, as the training loops do)."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label, skipped = load_readable(self.base, index)
        if not self.transforms:
            return {"views": [image], "label": label, "index": index, "skipped": "\n".join(skipped)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            views = [t(image) for t in self.transforms]
        return {"views": views, "label": label, "index": index, "skipped": "\n".join(skipped)}


def collate_skipped(batch_skipped: Sequence[str]) -> list[str]:
    """Flatten the per-item ``skipped`` strings of a collated batch into a list of paths."""
    return [p for s in batch_skipped for p in s.split("\n") if p]
