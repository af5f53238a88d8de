"""EfficientAd: a PDN student-teacher pair plus an autoencoder, at millisecond latency (Batzner et al., 2024).

https://arxiv.org/abs/2303.14535 — parameter names and defaults follow anomalib's ``EfficientAd``
(Adam lr 1e-4, weight decay 1e-5, the learning rate divided by 10 after 95 % of the steps).

- The teacher is a PDN distilled from an ImageNet backbone; ``teacher_weights`` is a file written by
  ``oddeye distill-teacher``. Its outputs are normalised per channel over the training set.
- The student learns the teacher on the hardest features only (the ``q_st`` quantile of its errors) and
  is pushed to zero on natural images (the ImageNet penalty, ``imagenet_dir``), so it fails on anomalies.
- The autoencoder learns the teacher on augmented images; the student's second half learns the autoencoder.
- Maps: student-teacher and student-autoencoder errors, each normalised by its 0.9 and 0.995 quantiles
  over held-out normal images, then averaged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import FitError, register
from oddeye.models.components.natural_images import NaturalImages
from oddeye.models.components.pdn import PDN, EfficientAdModelSize, PDNAutoencoder, read_teacher_file
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["EfficientAd"]

log = logging.getLogger(__name__)

# Map quantiles of the paper: qa → 0 and qb → 0.1 after normalisation.
QUANTILE_A, QUANTILE_B = 0.9, 0.995
# torch.quantile refuses more elements than this; larger map sets are subsampled.
_QUANTILE_MAX = 1 << 24


def _augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The paper's autoencoder augmentation: brightness, contrast or saturation by a factor in [0.8, 1.2]."""
    factor = float(rng.uniform(0.8, 1.2))
    kind = int(rng.integers(3))
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    if kind == 0:
        out = images * factor
    elif kind == 1:
        out = (images - grey.mean(dim=(2, 3), keepdim=True)) * factor + grey.mean(dim=(2, 3), keepdim=True)
    else:
        out = (images - grey) * factor + grey
    return out.clamp(0, 1)


@register("efficient_ad")
class EfficientAd(TrainedAnomalyModel):
    """EfficientAd S or M; the anomaly map averages the local (student) and logical (autoencoder) maps."""

    scheduler_interval = "step"

    mean: torch.Tensor
    std: torch.Tensor
    quantiles: torch.Tensor

    def __init__(
        self,
        imagenet_dir: str | None = "./datasets/imagenette",
        teacher_out_channels: int = 384,
        model_size: str = "small",
        lr: float = 0.0001,
        weight_decay: float = 0.00001,
        padding: bool = False,
        pad_maps: bool = True,
        batch_size: int = 1,
        teacher_weights: str | None = None,
        q_st: float = 0.999,
        max_epochs: int | None = 1000,
        max_steps: int | None = 70000,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        super().__init__(image_size=image_size)
        if not 0.0 <= q_st < 1.0:
            raise ValueError(f"q_st must be in [0, 1), got {q_st}")
        if teacher_out_channels < 1:
            raise ValueError(f"teacher_out_channels must be positive, got {teacher_out_channels}")
        self.model_size = EfficientAdModelSize.parse(model_size)
        self.teacher_out_channels = int(teacher_out_channels)
        self.imagenet_dir = imagenet_dir
        self.teacher_weights = teacher_weights
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.padding, self.pad_maps = bool(padding), bool(pad_maps)
        self.batch_size, self.q_st = int(batch_size), float(q_st)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        size = self.model_size.value
        self.teacher = PDN(teacher_out_channels, size, padding).requires_grad_(False)
        self.student = PDN(2 * teacher_out_channels, size, padding)
        self.ae = PDNAutoencoder(teacher_out_channels, self.image_size, padding)
        self.register_buffer("mean", torch.zeros(1, teacher_out_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, teacher_out_channels, 1, 1))
        # qa_st, qb_st, qa_ae, qb_ae; NaN until fitted (then maps are left unnormalised).
        self.register_buffer("quantiles", torch.full((4,), float("nan")))
        self._penalty: NaturalImages | None = None
        self._rng = np.random.default_rng(seed)
        self._total_steps = int(max_steps or 1 << 30)  # set from the data in on_train_start

    @property
    def device(self) -> torch.device:
        return self.mean.device

    # -- training
    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        self._load_teacher()
        self._penalty = self._penalty_images()
        try:
            super()._fit_normal(batches, progress)
        finally:
            self._penalty = None

    def _load_teacher(self) -> None:
        if self.teacher_weights is None:
            log.warning(
                "efficient_ad: no teacher_weights: the teacher PDN keeps random weights. For real use, distil one "
                "with `oddeye distill-teacher` and set teacher_weights"
            )
            return
        state = read_teacher_file(self.teacher_weights, self.model_size.value, self.teacher_out_channels)
        self.teacher.load_state_dict(state, strict=True)
        log.info("efficient_ad: teacher from %s", self.teacher_weights)

    def _penalty_images(self) -> NaturalImages | None:
        """The ImageNet penalty's images: ``imagenet_dir``; bundled photos when it is missing; None: no penalty."""
        if self.imagenet_dir is None:
            log.warning("efficient_ad: imagenet_dir is null: training WITHOUT the ImageNet penalty")
            return None
        if Path(self.imagenet_dir).is_dir():
            try:
                images = NaturalImages.from_folder(self.imagenet_dir)
            except ValueError as e:
                raise FitError(f"efficient_ad: imagenet_dir: {e}; point it at a folder of natural images") from e
            log.info("efficient_ad: ImageNet penalty on %d images from %s", len(images), self.imagenet_dir)
            return images
        try:
            images = NaturalImages.bundled()
        except Exception as e:  # scikit-image missing or broken: train without the penalty
            log.warning(
                "efficient_ad: imagenet_dir %r does not exist and scikit-image's photos are unavailable (%s): "
                "training WITHOUT the ImageNet penalty",
                self.imagenet_dir,
                e,
            )
            return None
        log.warning(
            "efficient_ad: imagenet_dir %r does not exist: the ImageNet penalty uses %d of %s instead (the library "
            "`oddeye data synth` takes its pictures from, minus those it uses); set imagenet_dir to a folder of "
            "natural images, or to null for no penalty",
            self.imagenet_dir,
            len(images),
            images.source,
        )
        return images

    def configure_optimizers(self) -> Any:
        params = list(self.student.parameters()) + list(self.ae.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        # anomalib: StepLR(step_size=0.95 * total steps, gamma=0.1); the total is known in on_train_start.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.1 if step >= int(0.95 * self._total_steps) else 1.0
        )
        return [opt], [sched]

    @torch.no_grad()
    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        """Teacher channel mean and std over the training set; the step count for the LR drop.

        Off CUDA this pass's teacher outputs are kept for the training steps: the Trainer autocasts only
        on CUDA, so elsewhere they are exactly what each step would compute. On CUDA the steps' teacher
        runs under autocast and caches its own outputs in the first epoch.
        """
        super().on_train_start(batches)
        total = sq = None
        n, count = 0, 0
        for batch in batches:
            if batch.device.type == "cuda":
                out = self.teacher(batch).double()
            else:
                out = self.frozen_features(batch, self.teacher).double()
            total = out.sum(dim=(0, 2, 3)) if total is None else total + out.sum(dim=(0, 2, 3))
            sq = out.pow(2).sum(dim=(0, 2, 3)) if sq is None else sq + out.pow(2).sum(dim=(0, 2, 3))
            n += out.shape[0] * out.shape[2] * out.shape[3]
            count += 1
        assert total is not None and sq is not None
        mean = total / n
        std = (sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        self.mean.copy_(mean.float().view_as(self.mean))
        self.std.copy_(std.float().view_as(self.std))
        steps = [s for s in (self.max_steps, (self.max_epochs or 0) * count) if s]
        self._total_steps = max(1, min(steps))
        self._rng = np.random.default_rng(self.seed)

    def _teacher(self, images: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's normalised output (``raw``: ``self.teacher(images)``, if known)."""
        with torch.no_grad():
            return ((self.teacher(images) if raw is None else raw) - self.mean) / self.std

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        c = self.teacher_out_channels
        # The plain batch's teacher output is cached (mean and std stay fixed during the steps); the
        # augmented batch's below is not: the augmentation is drawn anew every step.
        teacher = self._teacher(batch, self.frozen_features(batch, self.teacher))
        student = self.student(batch)
        distance = (teacher - student[:, :c]).pow(2)
        hard = torch.quantile(distance.detach().flatten()[:_QUANTILE_MAX].float(), self.q_st) if self.q_st > 0 else None
        loss_hard = distance[distance >= hard].mean() if hard is not None else distance.mean()
        loss_penalty = torch.zeros((), device=batch.device)
        if self._penalty is not None:
            natural = self._penalty.sample(self.batch_size, self.image_size, self._rng).to(batch.device)
            loss_penalty = self.student(natural)[:, :c].pow(2).mean()
        augmented = _augment(batch, self._rng)
        ae = self.ae(augmented)
        teacher_aug = self._teacher(augmented)
        student_aug = self.student(augmented)[:, c:]
        loss_ae = (teacher_aug - ae).pow(2).mean()
        loss_stae = (ae.detach() - student_aug).pow(2).mean()
        loss_st = loss_hard + loss_penalty
        return {
            "loss": loss_st + loss_ae + loss_stae,
            "st": loss_st.detach(),
            "ae": loss_ae.detach(),
            "stae": loss_stae.detach(),
        }

    @torch.no_grad()
    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        """Map quantiles over held-out normal images (the validation loader, else the training batches)."""
        super().on_train_end(batches)
        source = self._val_batches if self._val_batches is not None else batches
        st, ae = [], []
        for batch in source:
            map_st, map_ae = self._maps(batch)
            st.append(map_st.flatten())
            ae.append(map_ae.flatten())
        if not st:
            raise FitError("efficient_ad: no images to compute the map quantiles on")
        values = []
        for maps in (torch.cat(st), torch.cat(ae)):
            if maps.numel() > _QUANTILE_MAX:
                idx = torch.from_numpy(self._rng.choice(maps.numel(), _QUANTILE_MAX, replace=False))
                maps = maps[idx.to(maps.device)]
            q = torch.quantile(maps.float(), torch.tensor([QUANTILE_A, QUANTILE_B], device=maps.device))
            values += [float(q[0]), float(q[1])]
        self.quantiles.copy_(torch.tensor(values))

    # -- scoring
    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised student-teacher and student-autoencoder maps [B, 1, H, W] at the input size."""
        c = self.teacher_out_channels
        teacher = self._teacher(images)
        student = self.student(images)
        ae = self.ae(images)
        map_st = (teacher - student[:, :c]).pow(2).mean(1, keepdim=True)
        map_ae = (ae - student[:, c:]).pow(2).mean(1, keepdim=True)
        if self.pad_maps and not self.padding:
            map_st, map_ae = F.pad(map_st, (4, 4, 4, 4)), F.pad(map_ae, (4, 4, 4, 4))
        size = tuple(images.shape[-2:])
        map_st = F.interpolate(map_st, size=size, mode="bilinear", align_corners=False)
        map_ae = F.interpolate(map_ae, size=size, mode="bilinear", align_corners=False)
        return map_st, map_ae

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (max of the map) and the combined, quantile-normalised map [B, H, W]."""
        map_st, map_ae = self._maps(images.to(self.device))
        qa_st, qb_st, qa_ae, qb_ae = (float(q) for q in self.quantiles)
        if not math.isnan(qa_st):
            map_st = 0.1 * (map_st - qa_st) / max(qb_st - qa_st, 1e-12)
            map_ae = 0.1 * (map_ae - qa_ae) / max(qb_ae - qa_ae, 1e-12)
        amap = (0.5 * map_st + 0.5 * map_ae).squeeze(1)
        return amap.flatten(1).amax(1), amap
