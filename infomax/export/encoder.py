"""Exported encoder weights that timm (and the eval stage) load without any training code.

``export/encoder.safetensors`` holds the timm encoder's own state dict (timm key names);
``export/config.json`` says how to rebuild it. For a standard-stem encoder::

    timm.create_model(arch, pretrained=True, num_classes=0, in_chans=C,
                      pretrained_cfg_overlay=dict(file=".../encoder.safetensors", num_classes=0))

loads it with no missing or unexpected keys (``num_classes=0`` in the overlay too: timm loads strictly only when
the two agree); :func:`load_encoder` also handles ``small_input``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
from safetensors.torch import load_file, save
from torch import nn

from infomax.config.pretrain import ConfigError
from infomax.method.models import create_encoder
from infomax.runtime.files import write_atomically

WEIGHTS, META = "encoder.safetensors", "config.json"
REEXPORT = ("re-export it: rerun the pretraining command on its run dir, which writes the export again from the "
            "newest checkpoint")


class ExportFailed(Exception):
    """The export could not be written (disk full, a file-size limit); the checkpoint it comes from is intact."""


class DamagedExport(ConfigError):
    """An export whose config.json is damaged or whose weights are missing or changed."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; {REEXPORT}")
        self.problem = problem


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
    beside: dict[str, Callable[[dict[str, Any]], str]] | None = None,
) -> Path:
    """Write encoder.safetensors + config.json into ``out_dir``; returns the weights path.

    ``view_encoders``: (encoder, in_chans, input_transform) of the other views of a model with one
    encoder per view (CMC's ab encoder), written beside it as ``encoder_view<v>.safetensors`` and
    listed in config.json under ``view_encoders``; the eval stage scores their concatenation.
    ``beside``: file name -> its text made from config.json's contents (the model card, README.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # config.json vouches for the weights beside it, so it goes first and comes back last: an export cut
    # short (disk full, a kill) has none and is written again, never left stale beside new weights.
    (out_dir / META).unlink(missing_ok=True)
    weights = out_dir / WEIGHTS
    weights_sha256 = _save_weights(encoder, weights)
    views = []
    for v, (view_encoder, view_chans, view_transform) in enumerate(view_encoders, start=1):
        path = out_dir / f"encoder_view{v}.safetensors"
        views.append({"file": path.name, "in_chans": view_chans, "input_transform": view_transform,
                      "num_features": int(view_encoder.num_features), "sha256": _save_weights(view_encoder, path)})
    meta = export_meta(arch=arch, in_chans=in_chans, input_size=input_size, mean=mean, std=std,
                       num_features=int(encoder.num_features), small_input=small_input, stem_stride=stem_stride,
                       timm_kwargs=timm_kwargs, input_transform=input_transform, views=views, summary=summary,
                       weights_sha256=weights_sha256)
    for name, text in (beside or {}).items():
        write_atomically(out_dir / name, text(meta).encode())
    write_atomically(out_dir / META, (json.dumps(meta, indent=2) + "\n").encode())
    return weights


def export_meta(*, arch: str, in_chans: int, input_size: int, mean: Sequence[float], std: Sequence[float],
                num_features: int, small_input: bool, stem_stride: int = 1, timm_kwargs: dict[str, Any] | None = None,
                input_transform: str = "normalise", views: Sequence[dict[str, Any]] = (),
                summary: dict[str, Any] | None = None, weights_sha256: str = "") -> dict[str, Any]:
    """config.json's contents: how to rebuild the encoder, its input, the other views' encoders (``views``:
    in_chans, input_transform, num_features, and file and sha256 once written) and the run's summary. A
    pretraining run asks for it before its export exists, so that the eval to come is planned on it."""
    return {
        "architecture": arch,
        "in_chans": in_chans,
        "input_size": [in_chans, input_size, input_size],
        "mean": list(mean),
        "std": list(std),
        "num_features": num_features,
        "small_input": small_input,
        "stem_stride": stem_stride,
        "timm_kwargs": timm_kwargs or {},  # pass to timm.create_model as well (e.g. model.width's channels)
        # normalise: RGB/gray in [0,1], then (x - mean) / std.  lab_L: that, un-normalised, converted
        # to Lab, (L - 50) / 50 as the single channel (CMC's constants; infomax.data.colour.split_lab).
        "input_transform": input_transform,
        **({"view_encoders": list(views)} if views else {}),
        "summary": summary or {},
        "sha256": weights_sha256,
        "timm_version": timm.__version__,
    }


def _save_weights(encoder: nn.Module, path: Path) -> str:
    """The encoder's state dict as safetensors at ``path``; returns the file's sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in a per-process order, and the file's
    # sha256 (in config.json and every eval report) must be the same for the same weights. Serialised
    # here and written by Python, so a full disk is an OSError with its errno, not a SafetensorError.
    data = save(state, metadata={"format": "pt"})
    write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


REQUIRED_META = ("architecture", "timm_kwargs", "in_chans", "input_size", "mean", "std", "small_input", "stem_stride",
                 "num_features", "sha256")


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
        raise DamagedExport(f"{meta_path} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_META if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DamagedExport(f"{meta_path} lacks {', '.join(missing)}: it was written by an older version of infomax, "
                            "by something else, or edited")
    return meta


def load_encoder(path: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported encoder (eval mode) from an export directory; returns (encoder, meta).

    With ``verify`` the weights' sha256 must match config.json; keys must match exactly.
    """
    export_dir = export_dir_of(path)
    meta = read_meta(export_dir)
    return _load_weights(_checked_weights(export_dir, meta, verify), meta, meta["in_chans"]), meta


def load_view_encoders(path: str | Path, meta: dict[str, Any],
                       verify: bool = True) -> list[tuple[dict[str, Any], nn.Module]]:
    """The other views' encoders listed in config.json (CMC's ab encoder), as (entry, encoder); [] when none."""
    export_dir = export_dir_of(path)
    return [(entry, _load_weights(_checked_weights(export_dir, entry, verify), meta, entry["in_chans"]))
            for entry in meta.get("view_encoders", [])]


def export_problem(out_dir: Path) -> str | None:
    """Why the export in ``out_dir`` cannot be used as it is (config.json missing or damaged, weights
    missing or not the ones it names); None when it is intact."""
    try:
        meta = read_meta(out_dir)
        for entry in [meta, *meta.get("view_encoders", [])]:
            _checked_weights(out_dir, entry, verify=True)
    except DamagedExport as e:
        return e.problem
    except ConfigError as e:  # no config.json: the export was never finished
        return str(e)
    return None


def _checked_weights(export_dir: Path, entry: dict[str, Any], verify: bool) -> Path:
    """The weights file that ``entry`` (config.json, or one of its ``view_encoders``) names, present and,
    with ``verify``, matching its sha256."""
    weights = export_dir / entry.get("file", WEIGHTS)
    if not weights.is_file():
        raise DamagedExport(f"{weights} is missing beside its {META}")
    if verify and sha256(weights) != entry["sha256"]:
        raise DamagedExport(f"{weights} does not match the sha256 in {META}: the file was changed or damaged")
    return weights


def _load_weights(weights: Path, meta: dict[str, Any], in_chans: int) -> nn.Module:
    encoder = create_encoder(meta["architecture"], in_chans, meta["small_input"], meta["stem_stride"],
                             meta["timm_kwargs"])
    encoder.load_state_dict(load_file(str(weights)), strict=True)
    return encoder.eval()
