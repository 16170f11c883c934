"""The eval's scored rows, kept as each is scored, so that a stopped eval loses none: the rerun of the same
command (the same config and weights) reuses them instead of scoring them again.

Each row is one JSON file under ``OUT/rows/``, named by a hash of the eval's key (its resolved config, the exports'
sha256, the code's revision, the precision and the process count) and the row's place and name in the plan,
written atomically by the main process. It also keeps the torch RNG
state after the row, so that a row drawn later (a random init) is drawn as in an eval that never stopped.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from infomax.runtime.files import write_atomically


class RowCache:
    """Rows of one eval (``key``: its config and weights) under ``directory``."""

    def __init__(self, directory: Path, key: str, writer: bool) -> None:
        self.directory, self.key, self.writer = directory, key, writer
        self.kept = 0  # rows this eval has scored or reused so far

    def path(self, name: str) -> Path:
        return self.directory / (hashlib.sha256(f"{self.key}\n{name}".encode()).hexdigest()[:16] + ".json")

    def get(self, name: str, accelerator: Any) -> dict[str, Any] | None:
        """The row ``name`` as an earlier run of this eval scored it (the RNG restored to after it), or None. The main
        process reads it and every rank takes its answer, so that no rank skips a row the others compute."""
        kept = None
        if self.writer:
            try:
                kept = json.loads(self.path(name).read_text())
            except (OSError, ValueError):  # none, or damaged: score it again
                kept = None
            kept = kept if kept and kept.get("name") == name else None
        kept = broadcast_object_list([kept])[0] if accelerator.num_processes > 1 else kept
        if kept is None:
            return None
        torch.set_rng_state(torch.tensor(list(base64.b64decode(kept["rng"])), dtype=torch.uint8))
        self.kept += 1
        return kept["row"]

    def put(self, name: str, row: dict[str, Any]) -> None:
        self.kept += 1
        if self.writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
            write_atomically(self.path(name), json.dumps({"name": name, "row": row, "rng": rng}) + "\n")
