"""FastFlow: a 2-D normalizing flow per feature scale (Yu et al., 2021).

https://arxiv.org/abs/2111.07677 — parameter names and defaults follow anomalib's ``Fastflow``
(``flow_steps=8``, ``conv3x3_only=False``, ``hidden_ratio=1.0``, Adam lr 1e-3, weight decay 1e-5).
A frozen CNN's feature maps go through a trainable layer norm and a stack of AllInOneBlocks
whose subnets alternate 3×3 and 1×1 convolutions; the map is the negated mean, over scales,
of each position's latent likelihood, and the image score its maximum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from oddeye.models.base import register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.components.flows import (
    alternating_kernel_sizes,
    check_feature_sizes,
    conv_subnet,
    coupling_stack,
    feature_shapes,
    latent_log_likelihood,
    likelihood_map,
    nll_loss,
)
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Fastflow"]

log = logging.getLogger(__name__)


@register("fastflow")
class Fastflow(TrainedAnomalyModel):
    """FastFlow on any timm backbone: one flow per layer, trained by maximum likelihood."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights: str | None = None,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        max_epochs: int | None = 20,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``max_epochs``: anomalib leaves it to the engine (early stopping); 20 fits a small category here."""
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be ≥ 1, got {flow_steps}")
        self.backbone, self.layers = backbone, layers
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        shapes = feature_shapes(self.feature_extractor, self.image_size)
        check_feature_sizes(self.name, backbone, layers, shapes, self.image_size)
        if seed is not None:
            torch.manual_seed(seed)  # the flows' initial weights
        # anomalib normalises ResNet features with a trainable LayerNorm over [C, h, w] per scale.
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
        kernels = alternating_kernel_sizes(flow_steps, conv3x3_only)
        self.flows = nn.ModuleList(
            coupling_stack(
                shape,
                flow_steps,
                [conv_subnet(k, hidden_ratio) for k in kernels],
                affine_clamping=2.0,
                permute_soft=False,
                seed=i if seed is None else seed + i,
            )
            for i, shape in enumerate(shapes)
        )

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.feature_extractor(images.to(self.norms[0].weight.device)).values())

    def _latents(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents and log-Jacobians per scale (``features``: the backbone's maps of ``images``, if known)."""
        if features is None:
            features = self._features(images)
        zs, jacs = [], []
        for fmap, norm, flow in zip(features, self.norms, self.flows, strict=True):
            z, jac = flow(norm(fmap))
            zs.append(z)
            jacs.append(jac)
        return zs, jacs

    # -- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        zs, jacs = self._latents(batch, self.frozen_features(batch, self._features))
        return sum(nll_loss(z, jac) for z, jac in zip(zs, jacs, strict=True))

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and anomaly map [B, H, W]: −mean over scales of exp(−½ mean z²)."""
        zs, _ = self._latents(images)
        amap = likelihood_map([latent_log_likelihood(z) for z in zs], images.shape[-2:], aggregate="mean")
        return amap.flatten(1).amax(dim=1), amap
