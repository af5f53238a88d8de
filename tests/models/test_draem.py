"""DRAEM: learns from synthesised defects to find real ones; checkpoints; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.draem import Draem
from tests.models.helpers import assert_refuses_bad_checkpoints, assert_round_trip
from tests.models.helpers_synthesis import assert_learns, assert_nan_loss_stops, small_defect_data

SIZE = 32
TINY = {"base_width": 8, "disc_base_width": 8, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return small_defect_data(SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Draem:
    torch.manual_seed(0)
    model = Draem(**TINY, learning_rate=2e-3, max_epochs=None, max_steps=150, seed=0)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "draem" in list_models()
    model = create_model("draem", base_width=4, disc_base_width=4, image_size=[64, 64])
    assert isinstance(model, Draem)
    assert model.config["beta"] == [0.1, 1.0] and model.config["enable_sspcab"] is False
    assert model.config["sspcab_lambda"] == 0.1 and model.config["anomaly_source_path"] is None


def test_detects_defects_above_normal(fitted: Draem, data: dict) -> None:
    assert fitted.train_result is not None and fitted.train_result.steps == 150
    assert_learns(fitted, data)
    pred = fitted(data["defects"])
    assert pred.anomaly_map.shape == (10, SIZE, SIZE)


def test_save_load_round_trip(fitted: Draem, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "draem.ckpt")
    assert_refuses_bad_checkpoints(Draem, tmp_path)


def test_sspcab_adds_its_loss(data: dict) -> None:
    model = Draem(**TINY, enable_sspcab=True, max_epochs=None, max_steps=2)
    model.fit(data["train"][:8].split(4), progress=False)
    assert "sspcab" in model.train_result.history[0]
    assert model.reconstructive.bottom.__class__.__name__ == "SSPCAB"


def test_image_size_must_fit_the_network() -> None:
    with pytest.raises(ValueError, match=r"divisible by 32.*\[64, 96\]"):
        Draem(**{**TINY, "image_size": (80, 100)})


def test_empty_anomaly_source_path(tmp_path: Path, data: dict) -> None:
    model = Draem(**TINY, anomaly_source_path=str(tmp_path), max_epochs=None, max_steps=1)
    with pytest.raises(ValueError, match="holds no images"):
        model.fit(data["train"][:4].split(4), progress=False)
    assert not model.fitted


def test_nan_loss_stops_without_checkpoint(tmp_path: Path) -> None:
    assert_nan_loss_stops(Draem(**TINY, max_epochs=None, max_steps=3), SIZE, tmp_path)
