"""CS-Flow: fully convolutional cross-scale flows (Rudolph et al., 2022).

https://arxiv.org/abs/2110.02855 — parameter names and defaults follow anomalib's ``Csflow``
(``cross_conv_hidden_channels=1024``, ``n_coupling_blocks=4``, ``clamp=3``, ``num_channels=3``;
Adam lr 2e-4, betas (0.5, 0.9), eps 1e-4, weight decay 1e-5; gradients clipped to norm 1).
One frozen backbone layer sees the image at three scales (full, 1/2, 1/4); the flow keeps
the three feature maps apart but couples them through cross-scale convolutions. The image
score is the mean of ½z² over every latent; the map is, per scale, the channel mean of z²,
upsampled and multiplied over scales (``anomaly_map_mode: all``, anomalib's default) or the
finest scale alone (``max``, the paper's choice).

anomalib feeds EfficientNet-B5's stage 6 (304 channels, stride 32); timm's feature layers end
at stage boundaries, so the default here is ``blocks.6`` (512 channels, the same stride).
"""

from __future__ import annotations

import logging

import torch
from torch.nn.functional import interpolate

from oddeye.models.base import register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.components.cross_scale_flow import cross_scale_flow
from oddeye.models.components.flows import aggregate_maps, check_feature_sizes, nll_loss
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Csflow"]

log = logging.getLogger(__name__)

N_SCALES = 3
MAP_MODES = ("all", "max")


@register("csflow")
class Csflow(TrainedAnomalyModel):
    """CS-Flow on one timm backbone layer at three input scales."""

    supports_amp = False

    def __init__(
        self,
        backbone: str = "efficientnet_b5",
        layer: str = "blocks.6",
        pre_trained: bool = True,
        weights: str | None = None,
        cross_conv_hidden_channels: int = 1024,
        n_coupling_blocks: int = 4,
        clamp: float = 3.0,
        num_channels: int = 3,
        anomaly_map_mode: str = "all",
        lr: float = 2e-4,
        max_epochs: int | None = 20,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (768, 768),
    ) -> None:
        """``image_size`` defaults to anomalib's CS-Flow input (768); each side must be a multiple of 4× the stride."""
        super().__init__(image_size=image_size)
        if num_channels != 3:
            raise ValueError(f"num_channels must be 3 (oddeye feeds RGB images), got {num_channels}")
        if anomaly_map_mode not in MAP_MODES:
            raise ValueError(f"anomaly_map_mode must be one of {list(MAP_MODES)}, got {anomaly_map_mode!r}")
        self.backbone, self.layer, self.anomaly_map_mode = backbone, layer, anomaly_map_mode
        self.lr, self.max_epochs, self.max_steps, self.seed = float(lr), max_epochs, max_steps, seed
        self.feature_extractor = TimmFeatureExtractor(backbone, [layer], pre_trained=pre_trained, weights=weights)
        stride = self.feature_extractor.reductions[0]
        multiple = stride * 2 ** (N_SCALES - 1)
        if any(s % multiple for s in self.image_size):
            nearest = [max(multiple, round(s / multiple) * multiple) for s in self.image_size]
            raise ValueError(
                f"csflow: image_size {tuple(self.image_size)} must be a multiple of {multiple} on each side "
                f"({backbone} layer {layer!r} has stride {stride}, and the flow's {N_SCALES} scales halve the image "
                f"{N_SCALES - 1} times); e.g. {nearest}"
            )
        channels = self.feature_extractor.out_channels[0]
        h, w = (s // stride for s in self.image_size)
        dims = [[channels, h >> k, w >> k] for k in range(N_SCALES)]
        check_feature_sizes(self.name, backbone, [layer] * N_SCALES, [d[1:] for d in dims], self.image_size, 1)
        if seed is not None:
            torch.manual_seed(seed)
        self.flow = cross_scale_flow(dims, n_coupling_blocks, clamp, cross_conv_hidden_channels)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone layer's map of the image at full, 1/2 and 1/4 size."""
        images = images.to(self._anchor.device)
        h, w = images.shape[-2:]
        features = []
        for k in range(N_SCALES):
            scaled = (
                images if k == 0 else interpolate(images, size=(h >> k, w >> k), mode="bilinear", align_corners=False)
            )
            features.append(self.feature_extractor(scaled)[self.layer])
        return features

    def _latents(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents per scale and the log-Jacobian (``features``: ``_features(images)``, if known)."""
        if features is None:
            features = self._features(images)
        z, log_jac = self.flow(features)
        return list(z), log_jac

    # -- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.flow.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-5)

    def trainer_kwargs(self) -> dict:
        return {**super().trainer_kwargs(), "gradient_clip_val": 1.0}

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        z, log_jac = self._latents(batch, self.frozen_features(batch, self._features))
        return nll_loss(z, log_jac, per_dimension=True)

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (mean ½z² over all latents) and map [B, H, W] (channel-mean z², over scales)."""
        z, _ = self._latents(images)
        score = torch.cat([t.flatten(1) for t in z], dim=1).pow(2).mean(1) / 2
        per_scale = [t.pow(2).mean(dim=1) for t in z]
        if self.anomaly_map_mode == "max":
            per_scale = per_scale[:1]
        amap = aggregate_maps(per_scale, images.shape[-2:], aggregate="prod")
        return score, amap
