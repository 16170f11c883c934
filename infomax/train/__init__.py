"""Pretraining: the entry (train), the run's parts, one step, the shared resumable loop, the online probe."""
