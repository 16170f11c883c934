"""The AlexNet baselines, measured by the same code as our encoders, and the published reference rows.

- Supervised AlexNet: torchvision's architecture, adapted to the input channels and (for small
  images) conv1, trained end to end with labels on the same train split, scored on the same test split.
- AlexNet conv1..conv5 linear probes from a weights file the user already has (e.g. torchvision's
  IMAGENET1K_V1 ``alexnet-owt-7be5be79.pth``); each layer's ReLU output is average-pooled to about
  9k dimensions as in Zhang et al.'s split-brain protocol. Nothing is downloaded.
- Published numbers for ImageNet, quoted (kind ``published``) with their sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from infomax.config.pretrain import ConfigError

# (name, top-1 %, source); quoted, never measured here.
PUBLISHED: list[tuple[str, float, str]] = [
    ("AlexNet supervised (as cited by CMC)", 59.3, "Tian et al. 2019, Contrastive Multiview Coding (ImageNet linear "
                                                   "evaluation)"),
    ("AlexNet supervised (torchvision)", 56.5, "torchvision AlexNet_Weights.IMAGENET1K_V1, acc@1 56.522"),
    ("AlexNet conv5 linear probe", 50.5, "Zhang et al. 2017, Split-Brain Autoencoders (ImageNet conv5 linear "
                                         "classifier)"),
    ("CMC ResNet-50", 64.1, "Tian et al. 2019, Contrastive Multiview Coding"),
    ("AMDIM", 68.1, "Bachman et al. 2019, Learning Representations by Maximizing MI Across Views"),
    ("MoCo v2 ResNet-50, 200 epochs", 67.5, "Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning, "
                                            "Table 1"),
]
REFERENCE_ALEXNET_TOP1 = 0.593  # the supervised AlexNet figure the seed claim is measured against

# conv index -> (position of its ReLU in torchvision's alexnet.features, pooled side); channels x side^2 ~ 9k.
CONV_LAYERS = {1: (1, 12), 2: (4, 7), 3: (7, 5), 4: (9, 6), 5: (11, 6)}  # 64*144, 192*49, 384*25, 256*36, 256*36
SMALL_INPUT = 64  # below this, conv1 (11x11 stride 4) and three max-pools would leave no spatial map


def published_rows() -> list[dict[str, Any]]:
    return [{"name": name, "kind": "published", "protocol": "quoted", "top1": round(top1 / 100, 4), "top5": None,
             "knn": None, "source": source} for name, top1, source in PUBLISHED]


def supervised_alexnet(in_chans: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision AlexNet for ``in_chans`` x ``image_size``^2 inputs.

    Small images (< 64 px) get a 5x5 stride-1 conv1 (as CIFAR variants of AlexNet do) so that the
    three max-pools still leave a spatial map; every other layer is torchvision's.
    """
    model = torchvision.models.alexnet(num_classes=num_classes)
    conv1 = model.features[0]
    if image_size < SMALL_INPUT:
        model.features[0] = nn.Conv2d(in_chans, conv1.out_channels, kernel_size=5, stride=1, padding=2)
    elif in_chans != conv1.in_channels:
        model.features[0] = nn.Conv2d(in_chans, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding)
    return model


def load_alexnet_features(path: str) -> nn.Sequential:
    """torchvision AlexNet's ``features`` with weights from ``path`` (a state dict, weights_only)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"bad value for config key 'baselines.alexnet_weights': '{path}' is not a file; give the "
                          "path of an AlexNet state dict, e.g. torchvision's alexnet-owt-7be5be79.pth")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"'{path}' does not load as a torch state dict ({type(e).__name__}); "
                          "baselines.alexnet_weights needs an AlexNet .pth state dict") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    features = {k.removeprefix("module.").removeprefix("features."): v for k, v in state.items()
                if k.removeprefix("module.").startswith("features.")}
    model = torchvision.models.alexnet().features
    try:
        model.load_state_dict(features)
    except RuntimeError as e:
        raise ConfigError(f"'{path}' is not a torchvision AlexNet state dict: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


class AlexNetConvFeatures(nn.Module):
    """The ReLU output of conv ``layer`` (1..5), average-pooled to ~9k dims and flattened: B x D."""

    def __init__(self, features: nn.Sequential, layer: int, in_chans: int) -> None:
        super().__init__()
        position, side = CONV_LAYERS[layer]
        self.trunk, self.pool, self.in_chans = features[: position + 1], nn.AdaptiveAvgPool2d(side), in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 1:  # ImageNet weights want RGB: grey images are repeated over 3 channels
            x = x.expand(-1, 3, -1, -1)
        return self.pool(self.trunk(x)).flatten(1)
