"""export/README.md, the model card: facts from the run, loading code that works with timm alone, and the
eval's scores added beside them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, pretrain_in_process
from infomax.export.encoder import export_encoder, load_encoder
from infomax.export.model_card import CARD, EVAL_HEADING, add_eval, card_text
from infomax.method.models import create_encoder

FACTS = {"name": "r", "objective": "contrastive", "bound": "infonce", "dataset": "synthetic", "train_images": 64,
         "views": [16, 16], "global_batch": 32, "processes": 1, "precision": "no (run.precision=no)", "seconds": 3.0,
         "machine": "a CPU", "revision": "abc1234", "config": "run:\n  dir: r\n"}


def python_in(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.parametrize("arch, small_input, stride", [("test_resnet", True, 2),  # a deep stem
                                                        ("resnet18", True, 1),  # a single-conv stem
                                                        ("test_resnet", False, 1)])  # timm's own stem
def test_card_code_loads_the_weights_with_timm_alone(tmp_path: Path, arch: str, small_input: bool, stride: int) -> None:
    torch.manual_seed(0)
    encoder = create_encoder(arch, 1, small_input=small_input, stem_stride=stride)
    export = tmp_path / "export"
    export_encoder(encoder, export, arch=arch, in_chans=1, input_size=16, mean=(0.5,), std=(0.25,),
                   small_input=small_input, stem_stride=stride, summary={"steps": 4, "epochs_trained": 0.5},
                   beside={CARD: lambda meta: card_text(meta, encoder, FACTS)})
    code = python_in((export / CARD).read_text())
    assert "from pretrain" not in code and "import pretrain" not in code  # timm, torch and safetensors only
    # timm's data config is the export's input, not its 224 px ImageNet default
    check = code + "import torch\ntorch.save({k: v for k, v in encoder.state_dict().items()}, 'loaded.pt')\n" \
                   "print(tuple(encoder(torch.zeros(2, 1, 16, 16)).shape))\n" \
                   "c = timm.data.resolve_model_data_config(encoder)\nprint(c['input_size'], c['mean'], c['std'])\n"
    proc = subprocess.run([sys.executable, "-c", check], cwd=export, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected, meta = load_encoder(export)
    assert proc.stdout.splitlines() == [f"(2, {meta['num_features']})", "(1, 16, 16) (0.5,) (0.25,)"]
    loaded = torch.load(export / "loaded.pt")
    assert loaded.keys() == expected.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.state_dict().items())
    # A weight missing from the file is an error: timm's own loader is strict only when num_classes agree
    from safetensors.torch import load_file, save_file

    weights = load_file(export / "encoder.safetensors")
    save_file({k: v for k, v in weights.items() if k != "layer4.0.conv1.weight"}, export / "encoder.safetensors")
    proc = subprocess.run([sys.executable, "-c", code], cwd=export, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "layer4.0.conv1.weight" in proc.stderr, proc.stderr[-2000:]


def test_a_cmc_card_says_its_encoders_take_lab_channels() -> None:
    """The card said every encoder took normalised pixels (mean and std of the RGB loader): CMC's take Lab."""
    from infomax.export.encoder import export_meta

    meta = export_meta(arch="test_resnet", in_chans=1, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                       num_features=64, small_input=True, stem_stride=1, input_transform="lab_L",
                       views=[{"file": "encoder_view1.safetensors", "in_chans": 2, "input_transform": "lab_ab",
                               "sha256": "0" * 64}])
    card = card_text(meta, create_encoder("test_resnet", 1, small_input=True), FACTS)
    assert "`lab_L`: an RGB image in [0, 1] converted to CIE Lab" in card and "(L - 50) / 50" in card
    assert "`lab_ab`: an RGB image in [0, 1] converted to CIE Lab, its a and b channels" in card
    assert "mean [0.5, 0.5, 0.5]" not in card and "mean=(0.5,), std=(0.5,)" in python_in(card)


def test_the_card_names_the_eval_protocol_of_the_data_it_was_pretrained_on() -> None:
    """It said `python eval/main.py weights=<this folder>` whatever the data: the eval's defaults, Fashion-MNIST,
    which an ImageNet export is refused by (channels) and any other scored with the wrong protocol."""
    from infomax.config.eval import EvalConfig, validate_eval
    from infomax.config.pretrain import load_config
    from infomax.export.model_card import EVAL_ARGS, EVAL_CROP, eval_command

    for dataset, args in EVAL_ARGS.items():
        config = args.split()[1]
        cfg = load_config(str(REPO / config), ["weights=[x]"], schema=EvalConfig, check=validate_eval)
        assert cfg.dataset == dataset and f" {args} weights=<this folder>" in eval_command(dataset)
        assert cfg.center_crop_ratio == EVAL_CROP.get(dataset, 1.0)  # the card tells timm the crop it scored with


def test_pretraining_writes_the_card_and_each_eval_replaces_its_scores(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    pretrain_in_process(capsys, f"run.dir={run_dir}", "run.max_steps=4", "monitor.knn_every=0")
    export = run_dir / "export"
    card, meta = (export / CARD).read_text(), json.loads((export / "config.json").read_text())
    for fact in ("timm `test_resnet`", "`contrastive`, bound `infonce`", "`synthetic`, 256 training images",
                 "4 steps, global batch 32 (1 process(es))", f"sha256 `{meta['sha256']}`", "git revision `",
                 "Not evaluated yet: run `python eval/main.py dataset=synthetic weights=<this folder>`",
                 "The resolved training config", f"dir: {run_dir}"):
        assert fact in card, fact
    add_eval(export, "| first | table |", "On synthetic, fast-v2.", tmp_path / "report.md")
    add_eval(export, "| second | table |", "On synthetic, fast-v2.", tmp_path / "report.md")
    card = (export / CARD).read_text()
    assert card.count(EVAL_HEADING) == 1 and "| second | table |" in card and "| first |" not in card
    assert "Not evaluated yet" not in card and f"dir: {run_dir}" in card and "## Load it" in card
    assert "The full report: [report.md](../../report.md)." in card  # relative to the card: it moves with the run
