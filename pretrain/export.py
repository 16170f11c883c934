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
    view_encoders: Sequence[tuple[nn.Module, int, str]] = (),
) -> Path:
    """Write encoder.safetensors + config.json into ``out_dir``; returns the weights path.

    ``view_encoders``: (encoder, in_chans, input_transform) of the other views of a model with one
    encoder per view (CMC's ab encoder), written beside it as ``encoder_view<v>.safetensors`` and
    listed in config.json under ``view_encoders``; the eval stage scores their concatenation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    _save_weights(encoder, weights)
    views = []
    for v, (view_encoder, view_chans, view_transform) in enumerate(view_encoders, start=1):
        path = out_dir / f"encoder_view{v}.safetensors"
        views.append({"file": path.name, "in_chans": view_chans, "input_transform": view_transform,
                      "num_features": int(view_encoder.num_features), "sha256": _save_weights(view_encoder, path)})
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
        # to Lab, (L - 50) / 50 as the single channel (CMC's constants; pretrain.data.colour.split_lab).
        "input_transform": input_transform,
        **({"view_encoders": views} if views else {}),
        "summary": summary,
        "sha256": sha256(weights),
        "timm_version": timm.__version__,
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def _save_weights(encoder: nn.Module, path: Path) -> str:
    """The encoder's state dict as safetensors at ``path``; returns the file's sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in a per-process order, and the file's
    # sha256 (in config.json and every eval report) must be the same for the same weights.
    save_file(state, str(path), metadata={"format": "pt"})
    return sha256(path)


REQUIRED_META = ("architecture", "in_chans", "input_size", "mean", "std", "small_input", "sha256")


def export_dir_of(path: str | Path) -> Path:
    """The export directory ``path`` names: the directory itself, or the one holding encoder.safetensors."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.is_file() and p.name == WEIGHTS:
        return p.parent
    raise ConfigError(f"no export found at '{path}': it is not a directory or a {WEIGHTS} file (exports are "
                      f"written to <run.dir>/export/)")


def read_meta(path: str | Path) -> dict[str, Any]:
    """config.json of an export directory (or of the directory holding encoder.safetensors), checked."""
    meta_path = export_dir_of(path) / META
    if not meta_path.is_file():
        raise ConfigError(f"no export found at '{path}': expected {META} and {WEIGHTS} (written to <run.dir>/export/)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta_path} is not valid JSON ({e}); re-export the encoder or restore the file") from None
    missing = [k for k in REQUIRED_META if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(f"{meta_path} lacks {', '.join(missing)}: it was not written by infomax's export, or was "
                          "edited; re-export the encoder")
    return meta


def load_encoder(path: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported encoder (eval mode) from an export directory; returns (encoder, meta).

    With ``verify`` the weights' sha256 must match config.json; keys must match exactly.
    """
    export_dir = export_dir_of(path)
    meta = read_meta(export_dir)
    weights = export_dir / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing beside its {META}; re-export the encoder or restore the file")
    if verify and sha256(weights) != meta["sha256"]:
        raise ConfigError(f"{weights} does not match the sha256 in {META}: the file was changed or damaged; re-export it")
    return _load_weights(weights, meta, meta["in_chans"]), meta


def load_view_encoders(path: str | Path, meta: dict[str, Any], verify: bool = True) -> list[tuple[dict[str, Any], nn.Module]]:
    """The other views' encoders listed in config.json (CMC's ab encoder), as (entry, encoder); [] when none."""
    export_dir = export_dir_of(path)
    out = []
    for entry in meta.get("view_encoders", []):
        weights = export_dir / entry["file"]
        if not weights.is_file():
            raise ConfigError(f"{weights} is missing beside its {META}, which lists it; re-export the encoders")
        if verify and sha256(weights) != entry["sha256"]:
            raise ConfigError(f"{weights} does not match the sha256 in {META}: the file was changed or damaged; re-export it")
        out.append((entry, _load_weights(weights, meta, entry["in_chans"])))
    return out


def _load_weights(weights: Path, meta: dict[str, Any], in_chans: int) -> nn.Module:
    encoder = create_encoder(meta["architecture"], in_chans, meta["small_input"], meta.get("stem_stride", 1),
                             meta.get("timm_kwargs"))
    encoder.load_state_dict(load_file(str(weights)), strict=True)
    return encoder.eval()
