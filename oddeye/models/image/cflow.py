"""CFLOW-AD: conditional normalizing flows on feature fibers (Gudovskiy et al., 2022).

https://arxiv.org/abs/2107.12571 — parameter names and defaults follow anomalib's ``Cflow``.
Each backbone layer gets its own flow (a ``decoder``) over single feature vectors ("fibers"),
conditioned on a 2-D positional encoding of where the fiber sits. Training shuffles the
fibers of each image batch and takes one optimiser step per ``fiber_batch_size`` of them, as
the paper does. A fiber's anomaly is its low likelihood per dimension; the map sums, over
layers, the upsampled likelihoods and negates them.

One change from anomalib: it divides each layer's likelihoods by their maximum *within the
scored batch*, so a frame's score depends on the other frames of its batch. Here the maximum
is taken once over the training images and kept in the checkpoint, so scores are per frame.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from oddeye.models.base import FitError, register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.components.flows import (
    check_feature_sizes,
    coupling_stack,
    fc_subnet,
    feature_shapes,
    gaussian_log_prob,
    likelihood_map,
    positional_encoding_2d,
)
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Cflow"]

log = logging.getLogger(__name__)

DECODERS = ("freia-cflow",)


@register("cflow")
class Cflow(TrainedAnomalyModel):
    """CFLOW with a timm backbone: one positional-conditional flow over fibers per layer."""

    automatic_optimization = False  # many fiber-batch steps per image batch
    supports_amp = False  # log-determinants in half precision lose the likelihood's resolution

    ll_max: torch.Tensor

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        pre_trained: bool = True,
        weights: str | None = None,
        fiber_batch_size: int = 64,
        decoder: str = "freia-cflow",
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        permute_soft: bool = False,
        lr: float = 1e-4,
        max_epochs: int | None = 10,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``max_steps`` counts image batches; each makes ``fibers / fiber_batch_size`` optimiser steps per layer."""
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
        if fiber_batch_size < 1:
            raise ValueError(f"fiber_batch_size must be ≥ 1, got {fiber_batch_size}")
        if condition_vector <= 0 or condition_vector % 4:
            raise ValueError(f"condition_vector must be a positive multiple of 4, got {condition_vector}")
        self.backbone, self.layers = backbone, layers
        self.fiber_batch_size, self.condition_vector = int(fiber_batch_size), int(condition_vector)
        self.lr, self.max_epochs, self.max_steps, self.seed = float(lr), max_epochs, max_steps, seed
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        shapes = feature_shapes(self.feature_extractor, self.image_size)
        check_feature_sizes(self.name, backbone, layers, shapes, self.image_size)
        self.shapes = shapes
        if seed is not None:
            torch.manual_seed(seed)
        self.decoders = nn.ModuleList(
            coupling_stack(
                [c],
                coupling_blocks,
                fc_subnet(2.0),
                affine_clamping=clamp_alpha,
                permute_soft=permute_soft,
                global_affine_type="SOFTPLUS",
                condition_dims=[self.condition_vector],
                seed=i if seed is None else seed + i,
            )
            for i, (c, _, _) in enumerate(shapes)
        )
        for i, (_, h, w) in enumerate(shapes):
            # [h*w, condition_vector], the same for every image: derived, not saved.
            pe = positional_encoding_2d(self.condition_vector, h, w).flatten(1).T.contiguous()
            self.register_buffer(f"pos_{i}", pe, persistent=False)
        self.register_buffer("ll_max", torch.zeros(len(shapes)))
        self._generator: torch.Generator | None = None

    def _position(self, i: int) -> torch.Tensor:
        return getattr(self, f"pos_{i}")

    def _fibers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the fibers of the batch [B*h*w, C] (image-major, then row-major positions)."""
        features = self.feature_extractor(images.to(self.ll_max.device))
        return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features.values()]

    def _log_likelihood(self, i: int, fibers: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """log p per dimension of each fiber under layer ``i``'s flow."""
        z, log_jac = self.decoders[i](fibers, c=[positions])
        return gaussian_log_prob(z, log_jac) / fibers.shape[1]

    # -- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.decoders.parameters(), lr=self.lr)

    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        super().on_train_start(batches)
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else 0)

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        (opt,) = self.optimizers
        fibers = self.frozen_features(batch, self._fibers)
        total, count = torch.zeros((), device=batch.device), 0
        for i, e_r in enumerate(fibers):
            n = e_r.shape[0]
            n_batches = n // self.fiber_batch_size
            if n_batches == 0:
                raise FitError(
                    f"cflow: a batch of {batch.shape[0]} image(s) gives {n} fibers at layer {self.layers[i]!r}, "
                    f"fewer than fiber_batch_size={self.fiber_batch_size}; use larger image batches, a larger "
                    "image_size or a smaller fiber_batch_size"
                )
            c_r = self._position(i).repeat(batch.shape[0], 1)
            perm = torch.randperm(n, generator=self._generator).to(e_r.device)
            for k in range(n_batches):
                end = (k + 1) * self.fiber_batch_size if k < n_batches - 1 else n  # the last takes the rest
                idx = perm[k * self.fiber_batch_size : end]
                loss = -torch.nn.functional.logsigmoid(self._log_likelihood(i, e_r[idx], c_r[idx]))
                if not torch.isfinite(loss).all():
                    return loss.mean().detach()  # the trainer stops with the step number
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                opt.step()
                total += loss.detach().sum()
                count += idx.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        """Keep each layer's largest log-likelihood on the training images: the map's per-layer scale."""
        super().on_train_end(batches)
        best = torch.full_like(self.ll_max, -torch.inf)
        for batch in batches:
            fibers = self.frozen_features(batch, self._fibers)  # the training steps' fibers
            for i, ll in enumerate(self._layer_log_likelihoods(batch, fibers)):
                best[i] = torch.maximum(best[i], ll.max())
        self.ll_max.copy_(torch.where(torch.isfinite(best), best, torch.zeros_like(best)))

    # -- scoring
    def _layer_log_likelihoods(
        self, images: torch.Tensor, fibers: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Per layer, each position's log-likelihood [B, h, w] (``fibers``: ``_fibers(images)``, if known)."""
        b = images.shape[0]
        out = []
        for i, e_r in enumerate(self._fibers(images) if fibers is None else fibers):
            _, h, w = self.shapes[i]
            ll = self._log_likelihood(i, e_r, self._position(i).repeat(b, 1))
            out.append(ll.view(b, h, w))
        return out

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and map [B, H, W]: −Σ over layers of the upsampled likelihoods."""
        lls = self._layer_log_likelihoods(images)
        amap = likelihood_map(lls, images.shape[-2:], aggregate="sum", shift=self.ll_max)
        return amap.flatten(1).amax(dim=1), amap
