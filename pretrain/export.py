"""Exported encoder weights that timm (and the eval stage) load without any training code.

``export/encoder.safetensors`` holds the timm encoder's own state dict (timm key names);
``export/config.json`` says how to rebuild it. For a standard-stem encoder::

    timm.create_model(arch, pretrained=True, num_classes=0, in_chans=C,
                      pretrained_cfg_overlay=dict(file=".../encoder.safetensors"))

loads it with no missing or unexpected keys; :func:`load_encoder` also handles ``small_input``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import timm
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.config import ConfigError
from pretrain.models import create_encoder

WEIGHTS, META = "encoder.safetensors", "config.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_encoder(
    encoder: nn.Module,
    out_dir: Path,
    *,
    arch: str,
    in_chans: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    small_input: bool,
    stem_stride: int = 1,
    timm_kwargs: dict[str, Any] | None = None,
    summary: dict[str, Any],
    input_transform: str = "normalise",
) -> Path:
    """Write encoder.safetensors + config.json into ``out_dir``; returns the weights path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(weights), metadata={"arch": arch, "format": "pt"})
    meta = {
        "architecture": arch,
        "in_chans": in_chans,
        "input_size": [in_chans, input_size, input_size],
        "mean": list(mean),
        "std": list(std),
        "num_features": int(encoder.num_features),
        "small_input": small_input,
        "stem_stride": stem_stride,
        "timm_kwargs": timm_kwargs or {},  # pass to timm.create_model as well (e.g. model.width's channels)
        # normalise: RGB/gray in [0,1], then (x - mean) / std.  lab_L: that, un-normalised, converted
        # to Lab, L / 50 - 1 as the single channel (pretrain.data.colour.split_lab).
        "input_transform": input_transform,
        "summary": summary,
        "sha256": sha256(weights),
        "timm_version": timm.__version__,
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def read_meta(path: str | Path) -> dict[str, Any]:
    """config.json of an export directory (or of the directory holding encoder.safetensors)."""
    p = Path(path)
    meta_path = (p if p.is_dir() else p.parent) / META
    if not meta_path.is_file():
        raise ConfigError(f"no export found at '{path}': expected {META} and {WEIGHTS} (written to <run.dir>/export/)")
    return json.loads(meta_path.read_text())


def load_encoder(path: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported encoder (eval mode) from an export directory; returns (encoder, meta).

    With ``verify`` the weights' sha256 must match config.json; keys must match exactly.
    """
    p = Path(path)
    export_dir = p if p.is_dir() else p.parent
    meta = read_meta(export_dir)
    weights = export_dir / WEIGHTS
    if verify and sha256(weights) != meta["sha256"]:
        raise ConfigError(f"{weights} does not match the sha256 in {META}: the file was changed or damaged; re-export it")
    encoder = create_encoder(meta["architecture"], meta["in_chans"], meta["small_input"], meta.get("stem_stride", 1),
                             meta.get("timm_kwargs"))
    encoder.load_state_dict(load_file(str(weights)), strict=True)
    return encoder.eval(), meta
