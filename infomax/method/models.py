"""timm encoders (optionally with a small-image stem) and projection heads, one or per view."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from infomax.config.pretrain import ConfigError, ModelConfig


def adapt_small_input(encoder: nn.Module, arch: str, stride: int = 1) -> nn.Module:
    """A small-image stem (CIFAR-style) for images of 64 px and below: no max-pool, first conv at ``stride``.

    For timm ResNet-family models: a single-conv stem (``conv1`` is a Conv2d, e.g. resnet50)
    becomes 3x3 at ``stride``; a deep stem (``conv1`` is a Sequential, e.g. resnet10t) keeps its
    convs with the first one at ``stride``. ``maxpool`` becomes Identity. Stride 1 feeds stage 1 at
    full resolution (28 px in, 28 px maps); stride 2 at half (14 px), about 4x cheaper. State-dict
    key names stay timm's; only a single-conv stem's ``conv1.weight`` changes shape.
    """
    conv1 = getattr(encoder, "conv1", None)
    if not hasattr(encoder, "maxpool") or not isinstance(conv1, (nn.Conv2d, nn.Sequential)):
        raise ConfigError(
            f"model.small_input=true is supported for ResNet-style timm models (conv1 + maxpool), not '{arch}'; "
            "set model.small_input=false or use e.g. model.arch=resnet18"
        )
    if isinstance(conv1, nn.Conv2d):
        encoder.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=stride, padding=1, bias=False)
    else:
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (stride, stride)
    encoder.maxpool = nn.Identity()
    return encoder


def timm_model(arch: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, **kwargs)``, untrained; a name timm does not know is a ConfigError."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model '{arch}' for model.arch; list them with timm.list_models()") \
                from None
        raise


def width_kwargs(arch: str, width: float) -> dict[str, Any]:
    """timm ResNet keyword arguments that scale every stage's width (and a deep stem's) by ``width``.

    ``{}`` for width 1. timm keeps a single-conv stem at 64 channels whatever ``stem_width`` says,
    so only deep stems ('d'/'t' variants) shrink there. The kwargs are recorded in the export's
    config.json (``timm_kwargs``) because ``timm.create_model`` needs them too.
    """
    if width == 1.0:
        return {}
    default = timm_model(arch)
    if not hasattr(default, "layer4") or not hasattr(default, "conv1"):
        raise ConfigError(f"model.width applies to timm ResNets (resnet18, resnet10t, ...), not '{arch}'; set "
                          "model.width=1")
    # A stage's width ("planes"): a Bottleneck's output over its expansion of 4, a BasicBlock's first conv.
    planes = [stage[0].conv3.out_channels // 4 if hasattr(stage[0], "conv3") else stage[0].conv1.out_channels
              for stage in (default.layer1, default.layer2, default.layer3, default.layer4)]
    kwargs: dict[str, Any] = {"channels": [max(8, round(c * width)) for c in planes]}
    if isinstance(default.conv1, nn.Sequential):  # deep stem: conv1[3] has stem_width channels
        kwargs["stem_width"] = max(8, round(default.conv1[3].out_channels * width))
    return kwargs


def create_encoder(arch: str, in_chans: int, small_input: bool, stem_stride: int = 1,
                   timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, **timm_kwargs)``: images (B x C x H x W) -> features (B x F)."""
    encoder = timm_model(arch, in_chans=in_chans, **(timm_kwargs or {}))
    return adapt_small_input(encoder, arch, stem_stride) if small_input else encoder


def encoder_from_config(cfg: ModelConfig, in_chans: int) -> nn.Module:
    return create_encoder(cfg.arch, in_chans, cfg.small_input, cfg.stem_stride, width_kwargs(cfg.arch, cfg.width))


def check_takes_views(model: nn.Module, arch: str, shapes: list[tuple[int, int]]) -> None:
    """One forward of two blank images per view, ``shapes[v]`` = (channels, pixels): an architecture that
    cannot take the views' size (a ViT built for 224 px, a ResNet that pools 8 px away) stops here, before
    the run dir is claimed, instead of at step 1. Eval mode and blank images: no RNG draw, no BN update."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model([torch.zeros(2, c, s, s) for c, s in shapes])
    except (AssertionError, RuntimeError, ValueError) as e:
        sizes = " and ".join(map(str, sorted({s for _, s in shapes})))
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"bad value for config key 'model.arch': '{arch}' cannot take the {sizes} px views of "
                          f"data.views ({why}); use "
                          "views of the size it is built for, or an arch for small images, e.g. model.arch=resnet18 "
                          "model.small_input=true") from None
    finally:
        model.train(was_training)


def projection_head(in_dim: int, dims: list[int], bn: bool) -> nn.Sequential:
    """MLP in_dim -> dims[0] -> ... -> dims[-1], with BN + ReLU between layers."""
    layers: list[nn.Module] = []
    widths = [in_dim, *dims]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(dims) - 1
        layers.append(nn.Linear(a, b, bias=last or not bn))
        if not last:
            layers += [nn.BatchNorm1d(b)] if bn else []
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MultiViewModel(nn.Module):
    """Encoder(s) + projection head(s) for V views.

    ``encoders[v]`` / ``heads[v]`` may be the same module for all v (shared) or one per view.
    """

    def __init__(self, cfg: ModelConfig, in_chans: int | list[int], num_views: int) -> None:
        super().__init__()
        self.in_chans = in_chans if isinstance(in_chans, list) else [in_chans] * num_views
        n_enc = num_views if cfg.encoder_per_view else 1
        n_head = num_views if not cfg.shared_head else 1
        self.encoders = nn.ModuleList(encoder_from_config(cfg, self.in_chans[v]) for v in range(n_enc))
        self.feature_dim: int = self.encoders[0].num_features
        self.heads = nn.ModuleList(projection_head(self.feature_dim, list(cfg.head_dims), cfg.head_bn)
                                   for _ in range(n_head))
        self.num_views = num_views

    def encoder_for(self, view: int) -> nn.Module:
        return self.encoders[view if len(self.encoders) > 1 else 0]

    def forward(self, views: list[torch.Tensor], with_features: bool = False):
        """V tensors (B x C x H x W) -> V embeddings (B x head_dims[-1]); with ``with_features`` also
        view 0's encoder features (B x feature_dim), for the online probe."""
        out, features = [], None
        for v, x in enumerate(views):
            head = self.heads[v if len(self.heads) > 1 else 0]
            h = self.encoder_for(v)(x)
            features = h if v == 0 else features
            out.append(head(h))
        return (out, features) if with_features else out


class LocalGlobalModel(nn.Module):
    """Encoder(s) returning a global embedding and local embeddings at chosen stages (AMDIM, DIM).

    The local feature maps come from timm's ``forward_intermediates`` (so any timm ResNet works and
    the encoder keeps timm's key names for export); each stage gets a 1x1-conv embedding head
    (AMDIM's "NIN" layers), the pooled feature the usual MLP head.

    forward(views) -> per view a dict: ``global``: B x D, ``local``: list over stages of B x N_s x D
    (N_s = H_s * W_s positions).
    """

    def __init__(self, cfg: ModelConfig, in_chans: int, num_views: int, local_stages: list[int]) -> None:
        super().__init__()
        n_enc = num_views if cfg.encoder_per_view else 1
        self.encoders = nn.ModuleList(encoder_from_config(cfg, in_chans) for _ in range(n_enc))
        enc = self.encoders[0]
        if not hasattr(enc, "forward_intermediates"):
            raise ConfigError(f"'{cfg.arch}' has no forward_intermediates in timm; AMDIM/DIM need e.g. a ResNet")
        self.local_stages = list(local_stages)
        stages = len(getattr(enc, "feature_info", []))
        if any(not 0 <= i < stages for i in self.local_stages):
            raise ConfigError(f"bad value for config key 'objective.local_stages': {self.local_stages} is out of range "
                              f"for {cfg.arch}, whose feature maps are numbered 0 to {stages - 1} (0 = stem); "
                              "e.g. objective.local_stages=[3,4]")
        with torch.no_grad():
            probe = torch.zeros(1, in_chans, 64, 64)
            _, maps = enc.forward_intermediates(probe, indices=self.local_stages, intermediates_only=False)
        self.feature_dim: int = enc.num_features
        dim = cfg.head_dims[-1]
        self.global_head = projection_head(self.feature_dim, list(cfg.head_dims), cfg.head_bn)
        self.local_heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(m.shape[1], dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1)) for m in maps
        )

    def encoder_for(self, view: int) -> nn.Module:
        return self.encoders[view if len(self.encoders) > 1 else 0]

    def forward(self, views: list[torch.Tensor], with_features: bool = False):
        out, features = [], None
        for v, x in enumerate(views):
            enc = self.encoder_for(v)
            final, maps = enc.forward_intermediates(x, indices=self.local_stages, intermediates_only=False)
            pooled = enc.forward_head(final, pre_logits=True)
            features = pooled if v == 0 else features
            g = self.global_head(pooled)
            local = [head(m).flatten(2).transpose(1, 2) for head, m in zip(self.local_heads, maps)]  # B x N x D
            out.append({"global": g, "local": local})
        return (out, features) if with_features else out
