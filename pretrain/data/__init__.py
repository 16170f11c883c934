"""Datasets, multiview transforms and the training loader."""

from pretrain.data.datasets import DataError, ImageDataset
from pretrain.data.multiview import MultiViewDataset, collate_skipped
from pretrain.data.train_loader import build_dataset, build_knn_sets
from pretrain.data.transforms import build_eval_transform, build_view_transform

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
