"""Supervised baselines, trained once (``make baselines``) and stored in the
repository's ``baselines/`` directory, so that a fresh clone reports them without training.

A stored result is one JSON file: the row (top-1, top-5, epochs, steps, wall time, converged), the
dataset, the protocol it was scored under, a hash of the data, the config and the code revision.
The eval stage uses it when dataset, protocol and data hash all match, and marks the row as stored
with its date; anything else (another dataset or protocol, a damaged file) is ignored, a damaged
file with a warning, and the budgeted row is trained instead. No number is ever written into code.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from infomax.data import ImageDataset
from infomax.runtime.files import write_atomically

REPO_STORE = Path(__file__).resolve().parents[2] / "baselines"
REQUIRED = ("kind", "dataset", "protocol", "data_sha256", "top1", "top5", "epochs", "steps", "wall_s", "stopped",
            "converged")


def data_fingerprint(train: ImageDataset, test: ImageDataset, max_images: int = 100_000) -> str:
    """sha256 over both splits' sizes, every label and the pixels of up to ``max_images`` evenly spaced images each."""
    h = hashlib.sha256()
    for ds in (train, test):
        n = len(ds)
        h.update(f"{n}:".encode())
        h.update(bytes(ds.label(i) % 256 for i in range(n)))
        for i in range(0, n, max(1, n // max_images)):
            h.update(ds.load(i)[0].numpy().tobytes())
    return h.hexdigest()


def scored_split(holdout: int) -> str:
    """What the eval scores: the test split, or (``holdout`` > 0) the validation images held out of train."""
    return f"validation split ({holdout} train images held out)" if holdout else "test split"


def alexnet_protocol(size: int, center_crop_ratio: float, holdout: int = 0) -> str:
    """The supervised AlexNet's protocol string: a stored result is used only under the same one."""
    return f"supervised-v1: {size} px, centre crop ratio {center_crop_ratio}, {scored_split(holdout)}"


def store_dir(configured: str) -> Path:
    """``baselines.store`` as a directory: the repository's ``baselines/`` when empty."""
    return Path(configured) if configured else REPO_STORE


def find_stored(store: Path, kind: str, dataset: str, protocol: str,
                data_sha256: Callable[[], str]) -> dict[str, Any] | None:
    """The newest stored result of ``kind`` that matches dataset, protocol and data; None if none.

    ``data_sha256`` is called (it reads the whole dataset) only when some file matches the rest."""
    matches, data_hash = [], None
    for path in sorted(store.glob("*.json")) if store.is_dir() else []:
        try:
            result = json.loads(path.read_text())
            missing = [k for k in REQUIRED if k not in result]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            print(f"warning: stored baseline {path} is damaged ({e}); ignoring it", file=sys.stderr, flush=True)
            continue
        if (result["kind"], result["dataset"], result["protocol"]) != (kind, dataset, protocol):
            continue
        data_hash = data_hash or data_sha256()
        if result["data_sha256"] == data_hash:
            matches.append({**result, "stored_path": str(path)})
    return max(matches, key=lambda r: r.get("date", "")) if matches else None


def store_result(store: Path, row: dict[str, Any], *, dataset: str, protocol: str, data_sha256: str,
                 config: str, revision: str, suffix: str = "") -> Path:
    """Write one result as ``<store>/<dataset>-<kind><suffix>.json`` (atomically); returns the path."""
    store.mkdir(parents=True, exist_ok=True)
    result = {**row, "dataset": dataset, "protocol": protocol, "data_sha256": data_sha256,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_revision": revision, "config": config}
    path = store / f"{dataset}-{row['kind']}{suffix}.json"
    write_atomically(path, json.dumps(result, indent=2) + "\n")
    return path
