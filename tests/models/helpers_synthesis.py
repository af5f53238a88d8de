"""Checks shared by the tests of the models trained on synthesised defects (DRAEM, DSR, GLASS, GANomaly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.functional import interpolate

from oddeye.models.base import AnomalyModel, FitError
from tests.models.helpers import auroc, defect_data


def small_defect_data(size: int, n_train: int = 32, seed: int = 0) -> dict:
    """``defect_data`` drawn at 64 px and resized to ``size`` (so defects keep their relative size)."""
    data = defect_data(n_train=n_train, n_val=10, n_test=10, seed=seed)
    if size != 64:
        for key in ("train", "val", "normal", "defects"):
            data[key] = interpolate(data[key], size=(size, size), mode="bilinear", align_corners=False)
        data["centres"] = [(cy * size // 64, cx * size // 64) for cy, cx in data["centres"]]
    return data


def assert_learns(model: AnomalyModel, data: dict, min_auroc: float = 0.8) -> None:
    """Defects score above the same frames without them: AUROC and mean score."""
    normal, _ = model.raw_forward(data["normal"])[:2]
    anomalous, _ = model.raw_forward(data["defects"])[:2]
    assert auroc(normal, anomalous) >= min_auroc, (normal, anomalous)
    assert float(anomalous.mean()) > float(normal.mean())


def assert_nan_loss_stops(model: AnomalyModel, size: int, tmp_path: Path) -> None:
    """A NaN in the data makes the loss NaN: FitError naming the step; the model stays unfitted and unsaved."""
    images = torch.rand(4, 3, size, size)
    images[0, :, 0, 0] = float("nan")
    with pytest.raises(FitError, match=r"at step 0"):
        model.fit([images], progress=False)
    assert not model.fitted
    with pytest.raises(RuntimeError, match="unfitted"):
        model.save(tmp_path / "nan.ckpt")
    assert not (tmp_path / "nan.ckpt").exists()
