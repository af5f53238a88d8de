"""One training loop for every gradient-trained model, with no framework.

A trained model subclasses ``TrainedAnomalyModel`` and implements:

- ``configure_optimizers()`` → an optimizer, or ``(optimizers, schedulers)``; schedulers step
  once per epoch unless the model sets ``scheduler_interval = "step"``;
- ``training_step(batch, step)`` → the loss tensor, or a dict of named losses with ``"loss"``.
  With ``automatic_optimization = False`` the model runs its own backward/step calls (GANs,
  alternating objectives) through ``self.optimizers`` and returns its losses for reporting;
- optionally ``validation_loss(batch)`` (for early stopping), ``on_train_start(batches)`` and
  ``on_train_end(batches)`` (statistics over the training set before/after the gradient steps).

``Trainer`` runs epochs/steps with a seeded generator, gradient clipping, early stopping on a
validation loss, mixed precision on CUDA, a progress bar with the loss, and stops with the step
number and last finite loss when the loss goes NaN/inf. Nothing is written by the trainer: the
caller saves only after ``fit`` returns, so an error or Ctrl-C leaves no half-written checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from oddeye.models.base import DEFAULT_FOLDS, AnomalyModel, FitError, _CheckedBatches
from oddeye.models.components.feature_cache import FrozenFeatureCache
from oddeye.progress import progress_bar

__all__ = ["TrainResult", "TrainedAnomalyModel", "Trainer", "seed_everything"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch generator for the model's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainResult:
    """What a training run did: steps and epochs taken, the last loss, why it stopped."""

    steps: int = 0
    epochs: int = 0
    last_loss: float = float("nan")
    best_val_loss: float | None = None
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    """Mean of each named loss per epoch."""


class Trainer:
    """Runs a ``TrainedAnomalyModel``'s optimisation over re-iterable batches.

    ``max_epochs``/``max_steps``: whichever comes first (at least one must be set).
    ``gradient_clip_val``: clip the global gradient norm (None: off).
    ``early_stopping_patience``: stop after that many epochs without a better validation loss
    (needs validation batches and the model's ``validation_loss``).
    ``precision``: ``"auto"`` uses bf16/fp16 autocast on CUDA and float32 on the CPU; ``"32"`` never autocasts.
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        gradient_clip_val: float | None = None,
        early_stopping_patience: int | None = None,
        precision: str = "auto",
        seed: int | None = None,
        progress: bool = True,
        desc: str = "training",
    ) -> None:
        if not max_epochs and not max_steps:
            raise ValueError("set max_epochs or max_steps (at least one, > 0)")
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.gradient_clip_val = gradient_clip_val
        self.early_stopping_patience = early_stopping_patience
        self.precision = precision
        self.seed = seed
        self.progress = progress
        self.desc = desc

    def fit(
        self,
        model: TrainedAnomalyModel,
        batches: Iterable[torch.Tensor],
        val_batches: Iterable[torch.Tensor] | None = None,
    ) -> TrainResult:
        if self.seed is not None:
            seed_everything(self.seed)
        first = _first(batches)
        if first is None:
            raise FitError(f"{model.name}: training received no images")
        device = first.device
        model.to(device)
        opt = model.configure_optimizers()
        optimizers, schedulers = (list(opt[0]), list(opt[1])) if isinstance(opt, tuple) else ([opt], [])
        model.optimizers = optimizers
        amp_dtype = _amp_dtype(device, self.precision) if model.supports_amp else None
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        model.amp_scaler = scaler
        model._feature_cache.clear()
        try:
            return self._fit(model, batches, val_batches, optimizers, schedulers, amp_dtype, scaler, device)
        finally:
            model._feature_cache.clear()

    def _fit(
        self,
        model: TrainedAnomalyModel,
        batches: Iterable[torch.Tensor],
        val_batches: Iterable[torch.Tensor] | None,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        amp_dtype: torch.dtype | None,
        scaler: Any,
        device: torch.device,
    ) -> TrainResult:
        result = TrainResult()
        model.on_train_start(batches)
        total = self.max_steps or None
        bar = progress_bar(total=total, desc=f"{model.name}: {self.desc}", unit="step", disable=not self.progress)
        best, bad_epochs, last_finite = math.inf, 0, float("nan")
        epoch = 0
        try:
            while True:
                if self.max_epochs and epoch >= self.max_epochs:
                    result.stop_reason = "max_epochs"
                    break
                model.train()
                sums: dict[str, float] = {}
                n = 0
                for batch in batches:
                    step = result.steps
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = model.training_step(batch, step)
                    losses = out if isinstance(out, dict) else {"loss": out}
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    bad = [k for k, v in values.items() if not math.isfinite(v)]
                    if bad:
                        raise FitError(
                            f"{model.name}: loss {bad[0]} became {values[bad[0]]} at step {step} "
                            f"(epoch {epoch}); last finite loss {last_finite:.6g}. Nothing was saved; "
                            "try a lower learning rate"
                        )
                    if model.automatic_optimization:
                        self._optimise(model, optimizers[0], losses["loss"], scaler)
                    if model.scheduler_interval == "step":
                        for s in schedulers:
                            s.step()
                    last_finite = values.get("loss", next(iter(values.values())))
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    result.steps += 1
                    bar.update(1)
                    bar.set_postfix({k: v for k, v in values.items()}, refresh=False)
                    if self.max_steps and result.steps >= self.max_steps:
                        break
                if n == 0:
                    raise FitError(
                        f"{model.name}: the training batches yielded nothing in epoch {epoch}: "
                        "trained models need a re-iterable loader (a list or DataLoader, not a generator)"
                    )
                epoch += 1
                result.epochs = epoch
                if model.scheduler_interval == "epoch":
                    for s in schedulers:
                        s.step()
                if n:
                    result.history.append({k: v / n for k, v in sums.items()})
                if self.max_steps and result.steps >= self.max_steps:
                    result.stop_reason = "max_steps"
                    break
                if self.early_stopping_patience is not None and val_batches is not None:
                    val = self._validate(model, val_batches, amp_dtype)
                    if val is not None:
                        if val < best - 1e-12:
                            best, bad_epochs = val, 0
                        else:
                            bad_epochs += 1
                        result.best_val_loss = best
                        if bad_epochs >= self.early_stopping_patience:
                            result.stop_reason = "early_stopping"
                            break
        finally:
            bar.close()
            model.eval()
            model.optimizers = []
            model.amp_scaler = None
        result.last_loss = last_finite
        model.on_train_end(batches)
        log.info(
            "%s: trained %d step(s) in %d epoch(s), last loss %.4g (%s)",
            model.name,
            result.steps,
            result.epochs,
            result.last_loss,
            result.stop_reason,
        )
        model.train_result = result
        return result

    def _optimise(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if self.gradient_clip_val:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), self.gradient_clip_val)
            scaler.step(optimizer)
            scaler.update()
            return
        loss.backward()
        if self.gradient_clip_val:
            nn.utils.clip_grad_norm_(model.parameters(), self.gradient_clip_val)
        optimizer.step()

    @torch.no_grad()
    def _validate(
        self, model: TrainedAnomalyModel, val_batches: Iterable[torch.Tensor], amp_dtype: torch.dtype | None
    ) -> float | None:
        model.eval()
        total, n = 0.0, 0
        for batch in val_batches:
            with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model.validation_loss(batch)
            if loss is None:
                return None
            total += float(loss) * batch.shape[0]
            n += batch.shape[0]
        return total / n if n else None


class TrainedAnomalyModel(AnomalyModel):
    """An ``AnomalyModel`` learnt by gradient steps on the shared ``Trainer``.

    Subclasses take ``max_epochs``/``max_steps`` (and their own schedule) as constructor
    parameters and return them from ``trainer_kwargs``; ``_fit_normal`` runs the trainer.
    """

    automatic_optimization: bool = True
    scheduler_interval: str = "epoch"
    supports_amp: bool = True

    def __init__(self, image_size: tuple[int, int] | list[int] = (256, 256)) -> None:
        super().__init__(image_size=image_size)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.amp_scaler: Any = None
        self.train_result: TrainResult | None = None
        self._val_batches: Iterable[torch.Tensor] | None = None
        self._feature_cache = FrozenFeatureCache()

    # -- for models on a frozen network
    def frozen_features(self, batch: torch.Tensor, compute: Callable[[torch.Tensor], T]) -> T:
        """``compute(batch)`` once per distinct training batch and fit, then reused every epoch.

        For the output of a frozen network on the plain training batch only (see ``FrozenFeatureCache``).
        The ``Trainer`` empties the cache before ``on_train_start`` and after ``on_train_end``, also when
        a fit fails, so nothing outlives the fit.
        """
        return self._feature_cache.get(batch, compute)

    # -- to implement
    def configure_optimizers(self) -> Any:
        raise NotImplementedError

    def training_step(self, batch: torch.Tensor, step: int) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def validation_loss(self, batch: torch.Tensor) -> torch.Tensor | None:
        """Loss on normal validation images for early stopping; None: no early stopping."""
        return None

    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        """Before the first step (e.g. teacher channel statistics over the training set)."""

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        """After the last step (e.g. map quantiles over the training set)."""

    def trainer_kwargs(self) -> dict[str, Any]:
        """``Trainer`` arguments from the model's parameters (epochs, steps, clipping, seed)."""
        return {
            "max_epochs": getattr(self, "max_epochs", None),
            "max_steps": getattr(self, "max_steps", None),
            "seed": getattr(self, "seed", None),
        }

    # -- the AnomalyModel hooks
    def fit(
        self,
        train_loader: Iterable[torch.Tensor],
        val_loader: Iterable[torch.Tensor] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> AnomalyModel:
        """``AnomalyModel.fit``, keeping the validation batches for early stopping; other options pass through.

        Without ``val_loader`` the last of ``folds`` blocks of the training images is held out
        (``holdout_split``): one training run, normalised on images the deployed model never saw.
        """
        if val_loader is None:
            train_loader, val_loader = self.holdout_split(train_loader, kwargs.get("folds", DEFAULT_FOLDS))
        self._val_batches = None if val_loader is None else _CheckedBatches(val_loader, self._check_input)
        try:
            return super().fit(train_loader, val_loader, progress, **kwargs)
        finally:
            self._val_batches = None

    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        Trainer(progress=progress, **self.trainer_kwargs()).fit(self, batches, self._val_batches)


def _first(batches: Iterable[torch.Tensor]) -> torch.Tensor | None:
    it: Iterator[torch.Tensor] = iter(batches)
    return next(it, None)


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision in ("32", "32-true", "fp32") or device.type != "cuda":
        return None
    if precision in ("16", "16-mixed", "fp16"):
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
