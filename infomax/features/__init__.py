"""Frozen features of a split (decoded or .beton) and weighted kNN, shared by pretraining's monitor and the eval."""
