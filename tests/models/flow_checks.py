"""Checks every normalizing-flow model's tests share: learning, NaN stops, no checkpoint on failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import AnomalyModel, FitError
from tests.models.helpers import SIZE, auroc, map_peak_distances


def assert_learns(model: AnomalyModel, data: dict, min_auroc: float = 0.9, max_peak_px: float = 16.0) -> None:
    """Held-out defects score above held-out normals, and the map peaks near the defect."""
    normal, _ = model.raw_forward(data["normal"])
    anomalous, amap = model.raw_forward(data["defects"])
    assert torch.isfinite(normal).all() and torch.isfinite(anomalous).all()
    assert auroc(normal, anomalous) >= min_auroc, (normal, anomalous)
    assert amap.shape == (len(data["defects"]), SIZE, SIZE)
    distances = sorted(map_peak_distances(amap, data["centres"]))
    assert distances[len(distances) // 2] <= max_peak_px, distances  # the median defect is found


def assert_nan_stops_with_step(model: AnomalyModel, tmp_path: Path, data: dict) -> None:
    """A NaN log-likelihood during training stops with its step number; no checkpoint can be written."""
    good = data["train"][:4]
    bad = torch.full_like(good, float("nan"))
    with pytest.raises(FitError, match=r"became nan at step 2 .*last finite loss"):
        model.fit([good, good, bad], progress=False)
    assert not model.fitted
    with pytest.raises(RuntimeError, match="unfitted"):
        model.save(tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()
