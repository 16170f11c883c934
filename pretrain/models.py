"""timm encoders (optionally with a small-image stem) and projection heads, one or per view."""

from __future__ import annotations

import timm
import torch
from torch import nn

from pretrain.config import ConfigError, ModelConfig


def adapt_small_input(encoder: nn.Module, arch: str) -> nn.Module:
    """Stride-1 stem and no max-pool (CIFAR-style) for images of 64 px and below.

    For timm ResNet-family models: a single-conv stem (``conv1`` is a Conv2d, e.g. resnet50)
    becomes 3x3 stride 1; a deep stem (``conv1`` is a Sequential, e.g. resnet50d) keeps its
    convs with the first one at stride 1. ``maxpool`` becomes Identity. State-dict key names
    stay timm's; only a single-conv stem's ``conv1.weight`` changes shape.
    """
    conv1 = getattr(encoder, "conv1", None)
    if not hasattr(encoder, "maxpool") or not isinstance(conv1, (nn.Conv2d, nn.Sequential)):
        raise ConfigError(
            f"model.small_input=true is supported for ResNet-style timm models (conv1 + maxpool), not '{arch}'; "
            "set model.small_input=false or use e.g. model.arch=resnet18"
        )
    if isinstance(conv1, nn.Conv2d):
        encoder.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    else:
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    encoder.maxpool = nn.Identity()
    return encoder


def create_encoder(arch: str, in_chans: int, small_input: bool) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``: images (B x C x H x W) -> features (B x F)."""
    try:
        encoder = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model '{arch}' for model.arch; list them with timm.list_models()") from None
        raise
    return adapt_small_input(encoder, arch) if small_input else encoder


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
        self.encoders = nn.ModuleList(create_encoder(cfg.arch, self.in_chans[v], cfg.small_input) for v in range(n_enc))
        self.feature_dim: int = self.encoders[0].num_features
        self.heads = nn.ModuleList(projection_head(self.feature_dim, list(cfg.head_dims), cfg.head_bn) for _ in range(n_head))
        self.num_views = num_views

    def encoder_for(self, view: int) -> nn.Module:
        return self.encoders[view if len(self.encoders) > 1 else 0]

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """V tensors (B x C x H x W) -> V embeddings (B x head_dims[-1])."""
        out = []
        for v, x in enumerate(views):
            head = self.heads[v if len(self.heads) > 1 else 0]
            out.append(head(self.encoder_for(v)(x)))
        return out


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
        self.encoders = nn.ModuleList(create_encoder(cfg.arch, in_chans, cfg.small_input) for _ in range(n_enc))
        enc = self.encoders[0]
        if not hasattr(enc, "forward_intermediates"):
            raise ConfigError(f"'{cfg.arch}' has no forward_intermediates in timm; AMDIM/DIM need e.g. a ResNet")
        self.local_stages = list(local_stages)
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

    def forward(self, views: list[torch.Tensor]) -> list[dict[str, torch.Tensor | list[torch.Tensor]]]:
        out = []
        for v, x in enumerate(views):
            enc = self.encoder_for(v)
            final, maps = enc.forward_intermediates(x, indices=self.local_stages, intermediates_only=False)
            g = self.global_head(enc.forward_head(final, pre_logits=True))
            local = [head(m).flatten(2).transpose(1, 2) for head, m in zip(self.local_heads, maps)]  # B x N x D
            out.append({"global": g, "local": local})
        return out
