"""GeneralAD: an attention discriminator scores every patch of a frozen backbone (Sträter et al., ECCV 2024).

https://arxiv.org/abs/2407.12427 — parameter names and defaults follow anomalib's ``GeneralAD``. Normal
patch features and pseudo-anomalous copies of them (Gaussian noise, shuffled or copied patches, picked
at random or by the class token's attention) train a small transformer to tell them apart; a patch's
logit is its anomaly score and the image score is the mean of the ``top_k`` patch scores.

The paper's backbone is a ViT (DINOv2) and its blocks are ``layers`` (counted from 1). A CNN's patch
grid works too (``layers`` are then module names such as ``blocks.2``): the offline benchmark uses the
EfficientNet-Lite0 ImageNet weights because ViT weights cannot be fetched there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.components.vit_features import ViTFeatureExtractor, is_vit
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["FAKE_FEATURE_TYPES", "GeneralAD", "PatchDiscriminator"]

log = logging.getLogger(__name__)

FAKE_FEATURE_TYPES = (
    "random",
    "attn",
    "copy_out",
    "shuffle",
    "randshuffle",
    "copy_out_and_random",
    "copy_out_and_attn",
    "shuffle_and_random",
    "shuffle_and_attn",
    "randshuffle_and_random",
    "randshuffle_and_attn",
)
# Strategies that pick patches by the class token's attention: they need a ViT with a class token.
_NEEDS_ATTENTION = {"attn", "copy_out", "shuffle"}


class _AttentionBlock(nn.Module):
    """Self-attention over the patches, then an MLP, each with a residual (post-norm after attention)."""

    def __init__(self, dim: int, hidden_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim))
        self.drop_attn = nn.Dropout(dropout)
        self.drop_mlp = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.drop_attn(self.attn(x, x, x, need_weights=False)[0]))
        return x + self.drop_mlp(self.mlp(x))


class PatchDiscriminator(nn.Module):
    """Patch features [B, N, C] → one logit per patch [B, N] (learned position encodings, attention blocks)."""

    def __init__(self, dim: int, hidden_dim: int, num_patches: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(num_patches, dim))
        self.blocks = nn.Sequential(*[_AttentionBlock(dim, hidden_dim, heads, dropout) for _ in range(layers)])
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(features + self.position)).squeeze(-1)


@register("general_ad")
class GeneralAD(TrainedAnomalyModel):
    """GeneralAD: a patch discriminator trained on frozen features against self-made pseudo-anomalies."""

    def __init__(
        self,
        backbone: str = "vit_large_patch14_dinov2.lvd142m",
        layers: Sequence[int | str] = (24,),
        hidden_dim: int = 2048,
        lr: float = 0.0005,
        lr_decay_factor: float = 0.2,
        weight_decay: float = 1e-05,
        epochs: int = 160,
        noise_std: float = 0.25,
        dsc_layers: int = 1,
        dsc_heads: int = 4,
        dsc_dropout: float = 0.1,
        num_fake_patches: int = -1,
        fake_feature_type: str = "random",
        top_k: int = 10,
        pre_trained: bool = True,
        weights: str | None = None,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (518, 518),
    ) -> None:
        """``weights``: a local backbone state_dict (or ``offline:efficientnet_lite0``) instead of the hub's.

        ``epochs`` is both the training length and the cosine schedule's period; ``max_steps`` can stop sooner.
        """
        super().__init__(image_size=image_size)
        if fake_feature_type not in FAKE_FEATURE_TYPES:
            raise ValueError(f"fake_feature_type must be one of {list(FAKE_FEATURE_TYPES)}, got {fake_feature_type!r}")
        for name, value in (("top_k", top_k), ("num_fake_patches", num_fake_patches)):
            if value == 0 or value < -1:
                raise ValueError(f"{name} must be -1 (all patches) or a positive integer, got {value}")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        layers = [layers] if isinstance(layers, (str, int)) else list(layers)
        self.backbone, self.layers = backbone, layers
        self.lr, self.lr_decay_factor, self.weight_decay = float(lr), float(lr_decay_factor), float(weight_decay)
        self.epochs = self.max_epochs = int(epochs)
        self.max_steps, self.seed = max_steps, seed
        self.noise_std = float(noise_std)
        self.fake_feature_type = fake_feature_type
        parts = set(fake_feature_type.split("_and_"))

        self.vit = is_vit(backbone)
        if self.vit:
            if not all(isinstance(v, int) or str(v).isdigit() for v in layers):
                raise ValueError(f"a ViT backbone takes block numbers as layers (counted from 1), got {layers}")
            self.feature_extractor: nn.Module = ViTFeatureExtractor(
                backbone, [int(v) for v in layers], self.image_size, pre_trained=pre_trained, weights=weights
            )
            self.grid = self.feature_extractor.grid_size
            dim = sum(self.feature_extractor.out_channels)
            has_attention = self.feature_extractor.supports_class_attention
        else:
            self.feature_extractor = TimmFeatureExtractor(
                backbone, [str(v) for v in layers], pre_trained=pre_trained, weights=weights
            )
            with torch.no_grad():
                first = next(iter(self.feature_extractor(torch.zeros(1, 3, *self.image_size)).values()))
            self.grid = (int(first.shape[-2]), int(first.shape[-1]))
            dim = sum(self.feature_extractor.out_channels)
            has_attention = False
        self.uses_attention = bool(parts & _NEEDS_ATTENTION)
        if self.uses_attention and not has_attention:
            allowed = [t for t in FAKE_FEATURE_TYPES if not set(t.split("_and_")) & _NEEDS_ATTENTION]
            raise ValueError(
                f"fake_feature_type {fake_feature_type!r} picks patches by the class token's attention, which "
                f"backbone {backbone!r} does not have; use a ViT with a class token, or one of {allowed}"
            )
        if dim % dsc_heads:
            raise ValueError(f"dsc_heads={dsc_heads} must divide the feature dimension {dim} of {backbone} {layers}")
        self.num_patches = self.grid[0] * self.grid[1]
        self.top_k = self.num_patches if top_k < 0 else min(int(top_k), self.num_patches)
        self.num_fake_patches = self.num_patches if num_fake_patches < 0 else min(num_fake_patches, self.num_patches)
        self.discriminator = PatchDiscriminator(dim, hidden_dim, self.num_patches, dsc_layers, dsc_heads, dsc_dropout)

    @property
    def device(self) -> torch.device:
        return self.discriminator.position.device

    # -- features
    def _patch_features(
        self, images: torch.Tensor, attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frozen patch features [B, N, C] (row-major grid) and, for ViTs, class attention [B, heads, N]."""
        images = images.to(self.device)
        with torch.no_grad():
            if self.vit:
                grids, attn = self.feature_extractor.forward_with_attention(images, attention=attention, norm=True)
                maps = list(grids.values())
            else:
                maps, attn = list(self.feature_extractor(images).values()), None
                maps = [
                    m
                    if m.shape[-2:] == self.grid
                    else F.interpolate(m, self.grid, mode="bilinear", align_corners=False)
                    for m in maps
                ]
        features = torch.cat(maps, 1).flatten(2).transpose(1, 2)
        if not self.vit:
            # A ViT's tokens leave through its final LayerNorm; give CNN patches the same scale, so that
            # ``noise_std`` means the same for both.
            features = F.layer_norm(features, features.shape[-1:])
        return features.contiguous(), attn

    def _training_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen features of a training batch, computed once and reused every epoch (memory allowing)."""
        return self.frozen_features(images, lambda x: self._patch_features(x, attention=self.uses_attention))

    # -- pseudo-anomalies: each returns (features, mask [B, N] of the patches made anomalous)
    def _count(self, limit: int) -> int:
        return int(torch.randint(1, limit + 1, (1,)))

    def _attended(self, attn: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The ``k`` patches a random head of image ``b``'s class token attends to most."""
        head = int(torch.randint(0, attn.shape[1], (1,)))
        return attn[b, head].topk(k).indices

    def _random_patches(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(n)[:k].to(device)

    def _fake(self, kind: str, features: torch.Tensor, attn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        fake = features.clone()
        b, n, _ = features.shape
        mask = torch.zeros(b, n, dtype=torch.bool, device=features.device)
        for i in range(b):
            k = self._count(self.num_fake_patches)
            if kind in ("attn", "copy_out", "shuffle"):
                idx = self._attended(attn, i, k)  # type: ignore[arg-type]
            else:  # random, randshuffle
                idx = self._random_patches(n, k, features.device)
            if kind in ("random", "attn"):
                fake[i, idx] += torch.randn_like(fake[i, idx]) * self.noise_std
            elif kind == "copy_out":
                fake[i, idx] = features[i, self._random_patches(n, k, features.device)]
            else:  # shuffle, randshuffle: the chosen patches trade places
                fake[i, idx] = features[i, idx[torch.randperm(k).to(idx.device)]]
            mask[i, idx] = True
        return fake, mask

    # -- training on the shared Trainer
    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.discriminator.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=self.epochs, eta_min=self.lr * self.lr_decay_factor
        )
        return [opt], [cosine]

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        features, attn = self._training_features(batch)
        normal = self.discriminator(features)
        losses = {"normal": F.binary_cross_entropy_with_logits(normal, torch.zeros_like(normal))}
        noisy = self.discriminator(features + torch.randn_like(features) * self.noise_std)
        losses["noise"] = F.binary_cross_entropy_with_logits(noisy, torch.ones_like(noisy))
        for kind in self.fake_feature_type.split("_and_"):
            fake, mask = self._fake(kind, features, attn)
            losses[kind] = _balanced_bce(self.discriminator(fake), mask)
        losses["loss"] = sum(losses.values())  # type: ignore[assignment]
        return losses

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of the ``top_k`` patch logits [B], and the logit map upsampled to the input [B, H, W]."""
        features, _ = self._patch_features(images)
        logits = self.discriminator(features)
        score = logits.topk(self.top_k, dim=1).values.mean(1)
        amap = logits.view(-1, 1, *self.grid)
        amap = F.interpolate(amap, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        return score, amap


def _on_grid(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A feature map on the first layer's grid: finer maps average-pooled, coarser ones upsampled."""
    if tuple(fmap.shape[-2:]) == tuple(grid):
        return fmap
    if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(fmap, grid)
    return F.interpolate(fmap, grid, mode="bilinear", align_corners=False)


def _balanced_bce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE over the normal and the altered patches separately, summed: a few altered patches still count."""
    loss = logits.new_zeros(())
    for value in (False, True):
        picked = logits[mask == value]
        if picked.numel():
            loss = loss + F.binary_cross_entropy_with_logits(picked, torch.full_like(picked, float(value)))
    return loss
