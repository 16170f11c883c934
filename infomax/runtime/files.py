"""Records written whole or not at all: a run dir's config.yaml, its marker, the export, the report.

A write that fails part way (a full disk, a file-size limit, a kill) must leave the old file, never a cut one
that a rerun then reads as damaged. Checkpoints go through :mod:`infomax.runtime.checkpoint`, which adds a
manifest; everything else a run records goes through :func:`write_atomically`.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` beside ``path``, flush it to disk, then rename: ``path`` is the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
