"""U-Flow: a U-shaped multi-scale normalizing flow with an a-contrario threshold (Tailanian et al., 2022).

https://arxiv.org/abs/2211.12353 — parameter names and defaults follow anomalib's ``Uflow``
(``flow_steps=4``, ``affine_clamp=2.0``, ``affine_subnet_channels_ratio=1.0``,
``permute_soft=False``; Adam lr 1e-3, weight decay 1e-5, learning rate decaying linearly to
0.4× over 25 000 steps). Layer-normalised features of several backbone layers enter a flow
that starts at the coarsest scale: after each stage, part of the channels leaves as that
scale's latent and the rest is upsampled (invertibly) and joined to the next finer scale.
The map is the negated mean over scales of each position's latent likelihood; the score its max.

The a-contrario threshold needs no labels. Under normality every latent is standard normal,
so ``z² ≥ χ²₁(0.5)`` happens with probability 1/2 per channel. Around each position a
window counts such hits; a binomial tail gives how surprising the count is; summed over
scales and multiplied by the number of tests this is the number of false alarms (NFA).
``log10 NFA < 0`` (fewer than one false alarm expected over the image) marks a position, and
so a frame, anomalous. ``forward`` sets ``Prediction.label`` from this test; ``log_nfa``
gives the values. With ``alerts.threshold: auto`` the pipeline alerts on these labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import FrEIA.framework as ff
import FrEIA.modules as fm
import torch
from scipy import stats
from torch import nn
from torch.nn.functional import avg_pool2d, interpolate, pad

from oddeye.frames import Prediction
from oddeye.models.base import register
from oddeye.models.components import TimmFeatureExtractor
from oddeye.models.components.flows import (
    alternating_kernel_sizes,
    check_feature_sizes,
    conv_subnet,
    coupling_nodes,
    feature_shapes,
    latent_log_likelihood,
    likelihood_map,
    nll_loss,
    seeded_numpy,
)
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Uflow"]

log = logging.getLogger(__name__)

# anomalib's schedule: LinearLR from 1.0 to 0.4 of the learning rate over this many steps.
LR_DECAY_STEPS = 25_000


@register("uflow")
class Uflow(TrainedAnomalyModel):
    """U-Flow on any timm backbone (consecutive layers at strides ×2), with the NFA alert threshold."""

    scheduler_interval = "step"
    supports_amp = False
    nfa_threshold = True
    """This model labels frames itself with an unsupervised test: ``alerts.threshold: auto`` may use it."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights: str | None = None,
        flow_steps: int = 4,
        affine_clamp: float = 2.0,
        affine_subnet_channels_ratio: float = 1.0,
        permute_soft: bool = False,
        lr: float = 1e-3,
        nfa_window_size: int = 7,
        nfa_probability_thr: float = 0.5,
        max_epochs: int | None = 20,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (448, 448),
    ) -> None:
        """``backbone="mcait"`` (anomalib's default, CaiT towers from the hub) is not offered: any timm CNN works.

        ``nfa_window_size`` / ``nfa_probability_thr``: the a-contrario test's window at the finest
        scale (halved per coarser scale) and the per-channel candidate probability (anomalib's 7, 0.5).
        """
        super().__init__(image_size=image_size)
        layers = [layers] if isinstance(layers, str) else list(layers)
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be ≥ 1, got {flow_steps}")
        if not 0.0 < nfa_probability_thr < 1.0:
            raise ValueError(f"nfa_probability_thr must be in (0, 1), got {nfa_probability_thr}")
        if nfa_window_size < 1:
            raise ValueError(f"nfa_window_size must be ≥ 1, got {nfa_window_size}")
        self.backbone, self.layers = backbone, layers
        self.lr, self.max_epochs, self.max_steps, self.seed = float(lr), max_epochs, max_steps, seed
        self.nfa_window_size, self.nfa_probability_thr = int(nfa_window_size), float(nfa_probability_thr)
        self.feature_extractor = TimmFeatureExtractor(backbone, layers, pre_trained=pre_trained, weights=weights)
        shapes = feature_shapes(self.feature_extractor, self.image_size)
        check_feature_sizes(self.name, backbone, layers, shapes, self.image_size, min_size=2)
        for (_, h0, w0), (_, h1, w1), layer in zip(shapes, shapes[1:], layers[1:], strict=False):
            if (h0, w0) != (2 * h1, 2 * w1):
                raise ValueError(
                    f"uflow: layer {layer!r} gives {h1}×{w1} maps after {h0}×{w0}; the U-shaped flow needs each layer "
                    f"at half the previous one's size: pick layers at strides ×2 apart and an image_size that is a "
                    f"multiple of the coarsest stride ({self.feature_extractor.reductions[-1]})"
                )
        self.shapes = shapes
        if seed is not None:
            torch.manual_seed(seed)
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
        with seeded_numpy(0 if seed is None else seed):
            self.flow = self._build_flow(flow_steps, affine_clamp, affine_subnet_channels_ratio, permute_soft)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self._keep: list[torch.Tensor] | None = None
        self._keep_latents = False

    def _build_flow(self, steps: int, clamp: float, ratio: float, permute_soft: bool) -> ff.GraphINN:
        """Coarsest scale first: flow stage → split (one part out, the rest upsampled) → concat with the finer input."""
        subnets = [conv_subnet(k, ratio) for k in alternating_kernel_sizes(steps)]
        inputs = [ff.InputNode(*shape, name=f"features{i}") for i, shape in enumerate(self.shapes)]
        nodes: list[ff.Node] = []
        outputs: list[ff.OutputNode] = []
        last: ff.Node = inputs[-1]
        for i in reversed(range(1, len(inputs))):
            stage = coupling_nodes(last, subnets, clamp, permute_soft, name=f"stage{i}")
            channels = stage[-1].output_dims[0][0]
            keep = channels // 8 * 4  # a multiple of 4: IRevNet upsampling folds 4 channels into 2×2 pixels
            if keep == 0:
                raise ValueError(f"uflow: layer {self.layers[i]!r} has {channels} channels; the flow needs at least 8")
            split = ff.Node(stage[-1], fm.Split, {"section_sizes": (keep, channels - keep), "dim": 0}, name=f"split{i}")
            outputs.append(ff.OutputNode(split.out1, name=f"z{i}"))
            up = ff.Node(split.out0, fm.IRevNetUpsampling, {}, name=f"up{i}")
            last = ff.Node([inputs[i - 1].out0, up.out0], fm.Concat, {"dim": 0}, name=f"cat{i}")
            nodes += [*stage, split, up, last]
        stage = coupling_nodes(last, subnets, clamp, permute_soft, name="stage0")
        nodes += stage
        outputs.append(ff.OutputNode(stage[-1], name="z0"))
        return ff.GraphINN(inputs + nodes + outputs[::-1])  # latents finest first

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.feature_extractor(images.to(self._anchor.device)).values())

    def _latents(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents (finest first) and the log-Jacobian (``features``: the backbone's maps of ``images``, if known)."""
        if features is None:
            features = self._features(images)
        normed = [norm(f) for norm, f in zip(self.norms, features, strict=True)]
        z, log_jac = self.flow(normed)
        return list(z), log_jac

    # -- training
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.4, total_iters=LR_DECAY_STEPS)
        return [opt], [sched]

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        z, log_jac = self._latents(batch, self.frozen_features(batch, self._features))
        return nll_loss(z, log_jac)

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and map [B, H, W]: −mean over scales of exp(−½ mean z²)."""
        z, _ = self._latents(images)
        if self._keep_latents:
            self._keep = z
        amap = likelihood_map([latent_log_likelihood(t) for t in z], images.shape[-2:], aggregate="mean")
        return amap.flatten(1).amax(dim=1), amap

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Prediction:
        """The normalised ``Prediction``, with ``label`` from the a-contrario test (``log10 NFA < 0``)."""
        self._keep_latents = True
        try:
            pred = super().forward(images)
            z = self._keep
        finally:
            self._keep_latents, self._keep = False, None
        frame_log_nfa, _ = self.log_nfa_from_latents(z, images.shape[-2:])
        pred.label = frame_log_nfa < 0
        return pred

    @torch.no_grad()
    def log_nfa(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log10 NFA per frame [B] (its minimum over positions) and per position [B, H, W]; < 0 is anomalous."""
        images = self._check_input(images)
        z, _ = self._latents(images)
        return self.log_nfa_from_latents(z, images.shape[-2:])

    def log_nfa_from_latents(self, z: Sequence[torch.Tensor], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tau = float(stats.chi2.ppf(self.nfa_probability_thr, 1))
        log_probs = []
        for scale, zi in enumerate(z):
            half = max(int(self.nfa_window_size / 2**scale) // 2, 1)
            side = 2 * half + 1
            n = side * side
            hits = (zi.float().pow(2) >= tau).float()
            mode = "reflect" if half < min(hits.shape[-2:]) else "replicate"
            counts = avg_pool2d(pad(hits, (half,) * 4, mode=mode), side, stride=1) * n
            mean_count = counts.sum(dim=1) / zi.shape[1]  # candidates per window, averaged over channels
            k = mean_count.add(1e-4).floor().long().clamp(0, n)
            # log10 P(Binomial(n, 1 - p) > k) for every possible k: a lookup table instead of a per-pixel call
            table = stats.binom.logsf(range(n + 1), n, 1 - self.nfa_probability_thr) / math.log(10)
            table_t = torch.as_tensor(table, dtype=torch.float32, device=zi.device).clamp(min=-1e4)
            log_probs.append(table_t[k].unsqueeze(1))
        size = tuple(int(s) for s in size)
        up = [interpolate(lp, size=size, mode="bicubic", align_corners=True) for lp in log_probs]
        n_tests = sum(int(t.shape[-2] * t.shape[-1]) for t in z)
        log_nfa = math.log10(n_tests) + torch.cat(up, dim=1).sum(dim=1)
        return log_nfa.flatten(1).amin(dim=1), log_nfa
