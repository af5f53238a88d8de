"""GLASS: a discriminator on adapted patch features, trained on global and local synthetic anomalies.

Chen et al., "A Unified Anomaly Synthesis Strategy with Gradient Ascent for Industrial Anomaly
Detection and Localization", ECCV 2024 (https://arxiv.org/abs/2407.09359). Parameter names
and defaults follow anomalib's ``Glass``.

- Patch features of a frozen backbone (``layers``, ``patchsize``/``patchstride`` neighbourhoods,
  averaged to ``pretrain_embed_dim`` per layer and ``target_embed_dim`` in all) go through a
  trainable feature adaptor (``pre_projection`` linear layers).
- Global Anomaly Synthesis (GAS): normal features plus Gaussian noise (``gaussian_noise_std``),
  pushed by ``step`` steps of gradient ascent on the discriminator's "normal" loss (``mining``),
  every 5th step projected back into a band around the normal features (``svd=0``: radius 0.5
  to 1 around each feature; ``svd=1``: 1 to 2 times the ``radius_quantile`` of normal distances
  around the mean feature, the paper's hypersphere variant).
- Local Anomaly Synthesis (LAS): textures pasted through Perlin masks in image space
  (``anomaly_source_path`` or the built-in procedural textures).
- The discriminator (``discriminator_layers``, ``discriminator_hidden``) learns normal vs GAS
  with BCE and LAS patches with a focal loss on the hardest ``1 - focal_loss_quantile_threshold``
  of them. At inference: one backbone pass, the adaptor and the discriminator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import adaptive_avg_pool1d, interpolate, unfold

from oddeye.models.base import register
from oddeye.models.components import GaussianBlur2d, TimmFeatureExtractor
from oddeye.models.components.losses import binary_cross_entropy, focal_loss
from oddeye.models.components.synthesis import AnomalySynthesizer, resize_mask
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Glass"]

log = logging.getLogger(__name__)

# Step size of the gradient ascent on normalised gradients (the official implementation's 0.001).
ASCENT_LR = 1e-3
# GAS samples are projected back into their band every this many ascent steps.
PROJECT_EVERY = 5


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Projection(nn.Module):
    """The feature adaptor: ``n_layers`` linear maps of the patch features (LeakyReLU between them)."""

    def __init__(self, dim: int, n_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dim, dim))
            if i < n_layers - 1:
                layers.append(nn.LeakyReLU(0.2))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(nn.Module):
    """MLP → probability that a patch feature is anomalous."""

    def __init__(self, dim: int, n_layers: int = 2, hidden: int = 1024) -> None:
        super().__init__()
        body: list[nn.Module] = []
        width = dim
        for _ in range(n_layers - 1):
            body += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.body = nn.Sequential(*body)
        self.tail = nn.Linear(width, 1, bias=False)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tail(self.body(x))).squeeze(-1)


@register("glass")
class Glass(TrainedAnomalyModel):
    """GLASS: gradient-ascent global and Perlin-texture local anomaly synthesis; a patch discriminator scores."""

    center: torch.Tensor

    def __init__(
        self,
        anomaly_source_path: str | None = None,
        backbone: str = "wide_resnet50_2",
        pretrain_embed_dim: int = 1536,
        target_embed_dim: int = 1536,
        patchsize: int = 3,
        patchstride: int = 1,
        pre_trained: bool = True,
        layers: Sequence[str] | None = None,
        pre_projection: int = 1,
        discriminator_layers: int = 2,
        discriminator_hidden: int = 1024,
        learning_rate: float = 1e-4,
        step: int = 20,
        svd: int = 0,
        gaussian_noise_std: float = 0.015,
        radius_quantile: float = 0.75,
        focal_loss_quantile_threshold: float = 0.5,
        mining: bool = True,
        weights: str | None = None,
        max_epochs: int | None = 640,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (288, 288),
    ) -> None:
        """``max_epochs``: the paper trains 640 epochs; ``weights``: local backbone weights
        (``offline:efficientnet_lite0`` on machines with no internet)."""
        super().__init__(image_size=image_size)
        layers = ["layer2", "layer3"] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        checks = {
            "patchsize": patchsize >= 1,
            "patchstride": patchstride >= 1,
            "pre_projection": pre_projection >= 0,
            "discriminator_layers": discriminator_layers >= 1,
            "step": step >= 0,
            "svd": svd in (0, 1),
            "gaussian_noise_std": gaussian_noise_std > 0,
            "radius_quantile": 0 < radius_quantile <= 1,
            "focal_loss_quantile_threshold": 0 <= focal_loss_quantile_threshold < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"glass: invalid {', '.join(bad)}: patchsize/patchstride/discriminator_layers >= 1, "
                "pre_projection/step >= 0, svd 0 or 1, gaussian_noise_std > 0, radius_quantile in (0, 1], "
                "focal_loss_quantile_threshold in [0, 1)"
            )
        self.backbone, self.layers = backbone, layers
        self.pretrain_embed_dim, self.target_embed_dim = int(pretrain_embed_dim), int(target_embed_dim)
        self.patchsize, self.patchstride = int(patchsize), int(patchstride)
        self.pre_projection = int(pre_projection)
        self.learning_rate = float(learning_rate)
        self.step, self.svd = int(step), int(svd)
        self.gaussian_noise_std, self.radius_quantile = float(gaussian_noise_std), float(radius_quantile)
        self.focal_loss_quantile_threshold = float(focal_loss_quantile_threshold)
        self.mining = bool(mining)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.anomaly_source_path = anomaly_source_path

        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        self.projection = Projection(self.target_embed_dim, pre_projection) if pre_projection > 0 else nn.Identity()
        self.discriminator = Discriminator(self.target_embed_dim, discriminator_layers, discriminator_hidden)
        self.blur = GaussianBlur2d(sigma=4.0)
        grid = self.patch_grid
        # The mean adapted feature per patch position (the hypersphere centre of ``svd=1``).
        self.register_buffer("center", torch.zeros(grid[0] * grid[1], self.target_embed_dim))
        self.synthesizer: AnomalySynthesizer | None = None

    @property
    def device(self) -> torch.device:
        return self.center.device

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch rows and columns of the first layer (every layer is resampled to it)."""
        r = self.feature_extractor.reductions[0]
        pad = (self.patchsize - 1) // 2
        h, w = (s // r for s in self.image_size)
        return (
            (h + 2 * pad - self.patchsize) // self.patchstride + 1,
            (w + 2 * pad - self.patchsize) // self.patchstride + 1,
        )

    # -- features
    def _patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone patch embeddings [B * h * w, target_embed_dim] (no gradients: the backbone is frozen)."""
        with torch.no_grad():
            maps = list(self.feature_extractor(images.to(self.device)).values())
            pad = (self.patchsize - 1) // 2
            grid: tuple[int, int] | None = None
            per_layer = []
            for fmap in maps:
                b, c, h, w = fmap.shape
                patches = unfold(fmap, self.patchsize, padding=pad, stride=self.patchstride)  # [B, C*p*p, L]
                gh = (h + 2 * pad - self.patchsize) // self.patchstride + 1
                gw = (w + 2 * pad - self.patchsize) // self.patchstride + 1
                if grid is None:
                    grid = (gh, gw)
                elif (gh, gw) != grid:
                    patches = interpolate(patches.view(b, -1, gh, gw), size=grid, mode="bilinear", align_corners=False)
                patches = (
                    patches.reshape(b, c * self.patchsize**2, -1).transpose(1, 2).reshape(-1, 1, c * self.patchsize**2)
                )
                per_layer.append(adaptive_avg_pool1d(patches, self.pretrain_embed_dim))  # [N, 1, pretrain_dim]
            stacked = torch.cat(per_layer, dim=1).reshape(-1, 1, len(maps) * self.pretrain_embed_dim)
            return adaptive_avg_pool1d(stacked, self.target_embed_dim).squeeze(1)

    def _adapted(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted patch features (``features``: ``_patch_features(images)``, if known)."""
        return self.projection(self._patch_features(images) if features is None else features)

    # -- training
    def configure_optimizers(self) -> Any:
        groups = [{"params": self.discriminator.parameters(), "lr": 2 * self.learning_rate}]
        if self.pre_projection > 0:
            groups.append({"params": self.projection.parameters(), "lr": self.learning_rate})
        return torch.optim.Adam(groups)

    @torch.no_grad()
    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        """The LAS synthesiser; the mean adapted feature per patch position.

        Off CUDA this pass's patch features are kept for the training steps: the Trainer autocasts only
        on CUDA, so elsewhere they are exactly what each step would compute. On CUDA the steps' backbone
        runs under autocast and caches its own features in the first epoch.
        """
        super().on_train_start(batches)
        self.synthesizer = AnomalySynthesizer(
            self.anomaly_source_path, style="glass", seed=self.seed or 0, owner="glass"
        )
        total, n = torch.zeros_like(self.center), 0
        for images in batches:
            features = None if images.device.type == "cuda" else self.frozen_features(images, self._patch_features)
            feats = self._adapted(images, features).view(images.shape[0], -1, self.target_embed_dim)
            total += feats.sum(dim=0)
            n += images.shape[0]
        self.center.copy_(total / max(n, 1))

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        super().on_train_end(batches)
        self.synthesizer = None

    def _global_synthesis(self, true_feats: torch.Tensor, center: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """GAS: noisy normal features pushed towards "normal" by gradient ascent, kept in a truncated band."""
        base = true_feats.detach()
        gaus = base + self.gaussian_noise_std * torch.randn_like(base)
        if not self.mining:
            return gaus
        anchor, r = (center, radius) if self.svd == 1 else (base, base.new_tensor(0.5))
        for i in range(self.step):
            gaus = gaus.detach().requires_grad_(True)
            scores = self.discriminator(torch.cat([base, gaus]))[base.shape[0] :]
            loss = binary_cross_entropy(scores, torch.ones_like(scores))
            (grad,) = torch.autograd.grad(loss, [gaus])
            with torch.no_grad():
                gaus = gaus + ASCENT_LR * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
                if (i + 1) % PROJECT_EVERY == 0:
                    h = gaus - anchor
                    norm = h.norm(dim=1, keepdim=True)
                    gaus = anchor + h * (norm.clamp(r, 2 * r) / (norm + 1e-10))
        return gaus.detach()

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        assert self.synthesizer is not None, "training_step runs inside Trainer.fit"
        b = batch.shape[0]
        augmented, mask = self.synthesizer(batch)
        # Only the normal batch's backbone features are cached (before the adaptor, which trains); the LAS
        # images are synthesised anew every step.
        true_feats = self._adapted(batch, self.frozen_features(batch, self._patch_features))
        fake_feats = self._adapted(augmented)
        mask_s = resize_mask(mask, self.patch_grid).flatten()  # [N]
        center = self.center.repeat(b, 1)

        # Radius of the normal features around the centre (normal LAS patches count as normal).
        with torch.no_grad():
            normal = torch.cat([fake_feats[mask_s == 0], true_feats])
            normal_center = torch.cat([center[mask_s == 0], center])
            radius = torch.quantile((normal - normal_center).norm(dim=1).float(), self.radius_quantile)

        gaus = self._global_synthesis(true_feats, center, radius)
        scores = self.discriminator(torch.cat([true_feats, gaus]))
        true_scores, gaus_scores = scores[: true_feats.shape[0]], scores[true_feats.shape[0] :]
        true_loss = binary_cross_entropy(true_scores, torch.zeros_like(true_scores))
        gaus_loss = binary_cross_entropy(gaus_scores, torch.ones_like(gaus_scores))

        if self.svd == 1 and bool((mask_s == 1).any()):
            # LAS features on the hypersphere variant: pushed to 2-4 radii from the centre.
            sel = mask_s == 1
            h = fake_feats[sel] - center[sel]
            norm = h.norm(dim=1, keepdim=True)
            moved = center[sel] + h * (norm.clamp(2 * radius, 4 * radius) / (norm + 1e-10))
            fake_feats = fake_feats.clone()
            fake_feats[sel] = moved
        fake_scores = self.discriminator(fake_feats)
        target = mask_s
        if self.focal_loss_quantile_threshold > 0:
            error = (fake_scores.detach() - target) ** 2
            hard = error >= torch.quantile(error.float(), self.focal_loss_quantile_threshold)
            fake_scores, target = fake_scores[hard], target[hard]
        focal = focal_loss(fake_scores, target)
        loss = true_loss + gaus_loss + focal
        return {"loss": loss, "true": true_loss, "gaus": gaus_loss, "focal": focal}

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (most anomalous patch) and anomaly map [B, H, W] (patch scores, upsampled, blurred)."""
        b = images.shape[0]
        scores = self.discriminator(self._adapted(images)).view(b, 1, *self.patch_grid)
        amap = interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return scores.flatten(1).amax(dim=1), self.blur(amap).squeeze(1)
