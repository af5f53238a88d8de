"""The shared Trainer: step/epoch limits, NaN stops, early stopping, clipping, seeding, re-iterable data."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from oddeye.models.base import FitError
from oddeye.models.training import TrainedAnomalyModel, Trainer, seed_everything

SIZE = 16


class TinyModel(TrainedAnomalyModel):
    """A linear auto-encoder on pooled pixels: small enough to train in milliseconds."""

    name = "tiny_trained"

    def __init__(
        self,
        max_epochs: int | None = 2,
        max_steps: int | None = None,
        lr: float = 0.05,
        seed: int | None = 0,
        nan_at_step: int | None = None,
        image_size: tuple[int, int] | list[int] = (SIZE, SIZE),
    ) -> None:
        super().__init__(image_size=image_size)
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.lr = lr
        self.seed = seed
        self.nan_at_step = nan_at_step
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16, 4), nn.Linear(4, 3 * 16))
        self.steps_seen: list[int] = []
        self.started = self.ended = 0
        self.val_losses: list[float] = []

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        self.steps_seen.append(step)
        x = self._pooled(batch)
        loss = ((self.net(x) - x) ** 2).mean()
        if self.nan_at_step is not None and step >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}

    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        self.started += 1

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        self.ended += 1

    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self._pooled(images)
        return ((self.net(x) - x) ** 2).mean(1), None


class ValModel(TinyModel):
    """Reports a scripted validation loss per epoch, for early stopping."""

    name = "tiny_trained_val"
    script: tuple[float, ...] = (1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)

    def validation_loss(self, batch: torch.Tensor) -> torch.Tensor:
        value = self.script[min(len(self.val_losses) // 2, len(self.script) - 1)]  # 2 val batches per epoch
        self.val_losses.append(value)
        return torch.tensor(value)


def _batches(n: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n * batch, 3, SIZE, SIZE, generator=g).split(batch))


def test_max_epochs_and_max_steps_whichever_first() -> None:
    model = TinyModel(max_epochs=3, max_steps=None)
    result = Trainer(max_epochs=3, progress=False).fit(model, _batches(4))
    assert (result.steps, result.epochs, result.stop_reason) == (12, 3, "max_epochs")
    assert model.steps_seen == list(range(12)) and len(result.history) == 3

    model = TinyModel()
    result = Trainer(max_epochs=5, max_steps=6, progress=False).fit(model, _batches(4))
    assert (result.steps, result.epochs, result.stop_reason) == (6, 2, "max_steps")
    assert model.started == model.ended == 1
    assert not model.training  # left in eval mode
    assert model.optimizers == []  # no optimiser state kept on the model

    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        Trainer(progress=False)


def test_training_lowers_the_loss_and_fit_uses_the_trainer() -> None:
    model = TinyModel(max_epochs=10, lr=0.3)
    model.fit(_batches(4), progress=False)
    result = model.train_result
    assert result is not None and result.epochs == 10
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert "mse" in result.history[0]
    assert model.fitted


def test_nan_loss_stops_with_step_and_last_finite_loss_and_writes_nothing(tmp_path: Path) -> None:
    model = TinyModel(max_epochs=3, nan_at_step=5)
    ckpt = tmp_path / "model.ckpt"
    with pytest.raises(FitError, match=r"at step 5 \(epoch 1\); last finite loss \d") as e:
        model.fit(_batches(4), progress=False)
    assert "nan" in str(e.value) and "Nothing was saved" in str(e.value)
    assert not model.fitted and not model.training and model.optimizers == []
    with pytest.raises(RuntimeError, match="unfitted"):
        model.save(ckpt)
    assert not ckpt.exists() and list(tmp_path.iterdir()) == []


def test_zero_images_is_a_clear_error() -> None:
    with pytest.raises(FitError, match="no images"):
        TinyModel().fit([], progress=False)
    with pytest.raises(FitError, match="no images"):
        Trainer(max_steps=2, progress=False).fit(TinyModel(), [])


def test_one_shot_generator_is_refused() -> None:
    batches = _batches(2)
    with pytest.raises(FitError, match="re-iterable"):
        TinyModel(max_epochs=2).fit((b for b in batches), progress=False)


def test_early_stopping_on_validation_loss() -> None:
    model = ValModel(max_epochs=20)
    result = Trainer(max_epochs=20, early_stopping_patience=2, progress=False).fit(model, _batches(2), _batches(2))
    # val: 1.0, 0.5 (best), 0.6, 0.7 -> two epochs without improvement after epoch 2
    assert result.stop_reason == "early_stopping"
    assert result.epochs == 4 and result.best_val_loss == pytest.approx(0.5)

    # Through fit(): the validation loader reaches the trainer (via trainer_kwargs).
    class Patient(ValModel):
        name = "tiny_trained_patient"

        def trainer_kwargs(self) -> dict[str, Any]:
            return {**super().trainer_kwargs(), "early_stopping_patience": 1}

    model = Patient(max_epochs=20)
    model.fit(_batches(2), _batches(2), progress=False)
    assert model.train_result.stop_reason == "early_stopping" and model.train_result.epochs == 3

    # Without validation batches, no early stopping.
    result = Trainer(max_epochs=5, early_stopping_patience=1, progress=False).fit(ValModel(), _batches(2))
    assert result.stop_reason == "max_epochs"


def test_gradient_clipping_bounds_the_update() -> None:
    def first_update(clip: float | None) -> float:
        model = TinyModel(lr=1.0)
        before = [p.detach().clone() for p in model.net.parameters()]
        big = [torch.full((2, 3, SIZE, SIZE), 50.0)]  # huge inputs, huge gradients
        Trainer(max_steps=1, gradient_clip_val=clip, progress=False).fit(model, big)
        deltas = [p.detach() - b for p, b in zip(model.net.parameters(), before, strict=True)]
        return float(torch.sqrt(sum((d**2).sum() for d in deltas)))

    # SGD with lr=1: the step is the (clipped) gradient itself.
    assert first_update(0.5) == pytest.approx(0.5, rel=1e-4)
    assert first_update(None) > 100.0


def test_seeding_reproduces_training() -> None:
    def trained(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)  # the same initial weights every time
        model = TinyModel(max_epochs=2)
        # the model's own draws come after the trainer seeds everything
        model.training_step = _noisy(model.training_step)  # type: ignore[method-assign]
        Trainer(max_epochs=2, seed=seed, progress=False).fit(model, _batches(3))
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = trained(1), trained(1), trained(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    g1, g2 = seed_everything(7), seed_everything(7)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def _noisy(step_fn: Any) -> Any:
    """Adds a randomly drawn term to the loss, so the result depends on the global seed."""

    def step(batch: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
        out = step_fn(batch + 0.1 * torch.randn_like(batch), i)
        return out

    return step


def test_fit_passes_extra_options_to_the_base_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # AnomalyModel.fit's own options (e.g. the held-out folds) reach it through TrainedAnomalyModel.fit.
    from oddeye.models.base import AnomalyModel

    seen: dict[str, Any] = {}
    original = AnomalyModel.fit

    def recording_fit(self: AnomalyModel, train: Any, val: Any = None, progress: bool = True, **kw: Any) -> Any:
        seen.update(kw)
        return original(self, train, val, progress)

    monkeypatch.setattr(AnomalyModel, "fit", recording_fit)
    model = TinyModel(max_epochs=1)
    model.fit(_batches(4), _batches(2), progress=False, folds=3)
    assert seen == {"folds": 3} and model.fitted
