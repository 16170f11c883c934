"""Datasets, multiview transforms and the training loader."""

from infomax.data.datasets import DataError, ImageDataset
from infomax.data.multiview import MultiViewDataset, collate_skipped
from infomax.data.train_loader import build_dataset, build_knn_sets
from infomax.data.transforms import build_eval_transform, build_view_transform

__all__ = [
    "DataError",
    "ImageDataset",
    "MultiViewDataset",
    "build_dataset",
    "build_eval_transform",
    "build_knn_sets",
    "build_view_transform",
    "collate_skipped",
]
