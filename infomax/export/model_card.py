"""export/README.md, the model card: what the weights are, how they were made, how to load them, how good they are.

A user who receives only the export folder learns it all there, as beside a Hugging Face or timm
checkpoint. Pretraining writes the card with the export; the eval stage adds (or replaces) its
"Linear evaluation" section. The loading code is generated from the encoder itself and a test runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from infomax.runtime.files import write_atomically

CARD = "README.md"
EVAL_HEADING = "## Linear evaluation"


# The inputs an export's encoder takes, per its input_transform ("normalise" reads config.json's mean and std)
INPUTS = {"lab_L": "an RGB image in [0, 1] converted to CIE Lab (`infomax.data.colour.rgb_to_lab`), its L channel as "
                   "(L - 50) / 50: L / 100 normalised with mean 0.5 and std 0.5 (CMC's constants)",
          "lab_ab": "an RGB image in [0, 1] converted to CIE Lab, its a and b channels as (a - 6.025) / 92.2075 and "
                    "(b + 6.6895) / 101.1675 (CMC's constants)"}


def describe_input(transform: str, meta: dict[str, Any]) -> str:
    """What an encoder of this ``input_transform`` takes, in words (config.json's ``meta`` gives mean and std)."""
    return INPUTS.get(transform, f"pixels in [0, 1], then (x - mean) / std with mean {meta['mean']} and std "
                                 f"{meta['std']}")


# The centre crop of each dataset's shipped eval protocol (configs/probe_imagenet.yaml's center_crop_ratio; the
# others score whole images); a test holds it to the configs.
EVAL_CROP = {"imagefolder": 0.875}


def timm_data_config(meta: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The export's input as timm's pretrained_cfg states it, so that ``timm.data.resolve_model_data_config``
    gives its size, mean and std (not timm's 224 px ImageNet defaults), and the eval's transform on ``dataset``:
    resize, centre crop (:data:`EVAL_CROP`), bilinear. Lab's L is described as L / 100 at mean 0.5, std 0.5."""
    lab = meta["input_transform"] == "lab_L"
    return {"input_size": tuple(meta["input_size"]), "mean": (0.5,) if lab else tuple(meta["mean"]),
            "std": (0.5,) if lab else tuple(meta["std"]), "crop_pct": EVAL_CROP.get(dataset, 1.0),
            "interpolation": "bilinear"}


def loading_code(meta: dict[str, Any], encoder: nn.Module, dataset: str) -> str:
    """Python that rebuilds ``encoder`` (pretrained on ``dataset``) from the export with timm and safetensors alone
    (no infomax): strictly (a weight missing from the file is an error), with timm's data config set to the
    export's input."""
    kwargs = "".join(f", {k}={v!r}" for k, v in meta["timm_kwargs"].items())
    data = ", ".join(f"{k}={v!r}" for k, v in timm_data_config(meta, dataset).items())
    create = f'timm.create_model("{meta["architecture"]}", num_classes=0, in_chans={meta["in_chans"]}{kwargs}'
    if not meta["small_input"]:
        return ("import timm\n\n"
                "# num_classes=0 in the overlay as well: timm then loads strictly (without it, a weight missing\n"
                "# from the file would stay random without a word); the rest is this export's input, for timm's\n"
                "# data config\n"
                f"encoder = {create}, pretrained=True,\n"
                f'    pretrained_cfg_overlay=dict(file="encoder.safetensors", num_classes=0, {data}))\n'
                "encoder.eval()\n")
    stride = meta["stem_stride"]
    if isinstance(encoder.conv1, nn.Conv2d):
        stem = (f"encoder.conv1 = torch.nn.Conv2d({encoder.conv1.in_channels}, {encoder.conv1.out_channels}, 3, "
                f"stride={stride}, padding=1, bias=False)\n")
    else:  # a deep stem keeps its convs; the first one runs at the stem stride
        stem = ("first = next(m for m in encoder.conv1.modules() if isinstance(m, torch.nn.Conv2d))\n"
                f"first.stride = ({stride}, {stride})\n")
    return ("import timm\nimport torch\nfrom safetensors.torch import load_file\n\n"
            "# the overlay: this export's input, for timm's data config\n"
            f"encoder = {create},\n    pretrained_cfg_overlay=dict({data}))\n"
            f"# the small-image stem (model.small_input): a 3x3 first conv at stride {stride}, no max-pool\n"
            f"{stem}encoder.maxpool = torch.nn.Identity()\n"
            'encoder.load_state_dict(load_file("encoder.safetensors"))\n'
            "encoder.eval()\n")


# The eval's shipped protocol for the datasets that have one; another dataset is named on the command line.
EVAL_ARGS = {"fashion_mnist": "--config configs/probe_fmnist.yaml",
             "imagefolder": "--config configs/probe_imagenet.yaml root=<the image folder>"}


def eval_command(dataset: str) -> str:
    """The command that scores an export pretrained on ``dataset`` with that dataset's protocol."""
    return f"python eval/main.py {EVAL_ARGS.get(dataset, f'dataset={dataset}')} weights=<this folder>"


def card_text(meta: dict[str, Any], encoder: nn.Module, run: dict[str, Any], evaluated: str = "") -> str:
    """The card from config.json's ``meta`` and the run's facts (``evaluated``: an earlier card's eval section, kept
    when the same weights are exported again).

    ``run``: name, objective, bound, dataset, train_images, views (sizes), epochs, steps, global_batch,
    processes, precision, seconds, machine, revision, config (the resolved YAML)."""
    s = meta["summary"]
    pre = " x ".join(map(str, meta["input_size"]))
    views = ", ".join(f"{size} px" for size in run["views"])
    lines = [
        f"# {run['name']}: a {meta['architecture']} encoder pretrained without labels by infomax",
        "",
        f"Trained by maximising the `{run['bound']}` lower bound on the mutual information between views of the "
        f"same image (objective `{run['objective']}`). It maps an image to {meta['num_features']} features.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | timm `{meta['architecture']}`, `in_chans={meta['in_chans']}`"
        + (f", timm kwargs `{json.dumps(meta['timm_kwargs'])}`" if meta["timm_kwargs"] else "")
        + (f"; small-image stem (3x3 at stride {meta['stem_stride']}, no max-pool)"
           if meta["small_input"] else "")
        + " |",
        f"| input | {pre}, `{meta['input_transform']}`: {describe_input(meta['input_transform'], meta)} |",
        f"| objective | `{run['objective']}`, bound `{run['bound']}` |",
        f"| data | `{run['dataset']}`, {run['train_images']} training images, labels unused; views of {views} |",
        f"| training | {s.get('epochs_trained')} epochs, {s.get('steps')} steps, global batch {run['global_batch']} "
        f"({run['processes']} process(es)), precision {run['precision']} |",
        f"| wall time | {run['seconds']:.0f} s of pretraining on {run['machine']} |",
        f"| code | infomax, git revision `{run['revision']}` |",
        f"| weights | `encoder.safetensors`, sha256 `{meta['sha256']}` |",
    ]
    for view in meta.get("view_encoders", []):
        lines.append(f"| another view's encoder | `{view['file']}` (`in_chans={view['in_chans']}`, "
                     f"`{view['input_transform']}`: {describe_input(view['input_transform'], meta)}), "
                     f"sha256 `{view['sha256']}` |")
    lines += ["", "## Load it", "", "From this folder, with timm and safetensors only:", "", "```python",
              loading_code(meta, encoder, run["dataset"]).rstrip(), "```", "",
              "`encoder(images)` then gives a batch of feature vectors (B x "
              f"{meta['num_features']}) for images of B x {pre}. With infomax installed, "
              '`infomax.export.encoder.load_encoder("<this folder>")` does the same and checks the sha256.', "",
              *([evaluated.rstrip("\n")] if evaluated else [
                  EVAL_HEADING, "", f"Not evaluated yet: run `{eval_command(run['dataset'])}` from the infomax "
                  "repo, which adds the scores here."]),
              "", "<details><summary>The resolved training config</summary>", "", "```yaml",
              run["config"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def eval_section(export_dir: Path) -> str:
    """The card's "Linear evaluation" section as an eval wrote it ('' when there is none yet, or no card)."""
    card = export_dir / CARD
    text = card.read_text(errors="replace") if card.is_file() else ""
    _, found, rest = text.partition(EVAL_HEADING)
    section = EVAL_HEADING + rest.split("\n<details>")[0] if found else ""
    return "" if not found or "Not evaluated yet" in section else section


def add_eval(export_dir: Path, table: str, description: str, report: Path) -> None:
    """Put the eval's rows in the card's "Linear evaluation" section, replacing an earlier eval's."""
    card = export_dir / CARD
    text = card.read_text() if card.is_file() else f"# {export_dir.resolve().parent.name}\n\n{EVAL_HEADING}\n"
    head, found, rest = text.partition(EVAL_HEADING)
    if not found:
        head, rest = text.rstrip() + "\n\n", ""
    tail = rest[rest.index("\n<details>"):] if "\n<details>" in rest else ""
    # relative to the card, so the export still finds its report once copied elsewhere with its run dir
    link = Path(os.path.relpath(report.resolve(), export_dir.resolve())).as_posix()
    section = f"{EVAL_HEADING}\n\n{description}\n\n{table}\n\nThe full report: [{report.name}]({link}).\n"
    write_atomically(card, (head + section + tail).encode())
