"""CS-Flow: cross-scale flows learn normality at three scales; checkpoints; clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.csflow import Csflow
from tests.models.flow_checks import assert_learns, assert_nan_stops_with_step
from tests.models.helpers import SIZE, assert_round_trip, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {
    "backbone": "resnet18",
    "layer": "layer2",  # stride 8: 64 px gives 8×8, 4×4 and 2×2 maps
    "pre_trained": False,
    "cross_conv_hidden_channels": 32,
    "n_coupling_blocks": 2,
    "lr": 1e-3,
    "max_epochs": None,
    "max_steps": 24,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=32, n_val=16, n_test=12)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Csflow:
    model = Csflow(**TINY)
    model.fit(data["train"].split(8), data["val"].split(8), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "csflow" in list_models()
    model = create_model("csflow", backbone="resnet18", layer="layer2", pre_trained=False, image_size=[SIZE, SIZE])
    cfg = model.config
    assert (cfg["cross_conv_hidden_channels"], cfg["n_coupling_blocks"], cfg["clamp"], cfg["num_channels"]) == (
        1024,
        4,
        3.0,
        3,
    )
    assert cfg["anomaly_map_mode"] == "all"
    with pytest.raises(ValueError, match=r"anomaly_map_mode must be one of \['all', 'max'\]"):
        Csflow(**{**TINY, "anomaly_map_mode": "mean"})
    with pytest.raises(ValueError, match="num_channels must be 3"):
        Csflow(**{**TINY, "num_channels": 1})


def test_learns_and_localises(fitted: Csflow, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert_learns(fitted, data)


def test_map_modes(fitted: Csflow, data: dict) -> None:
    finest = Csflow(**{**TINY, "anomaly_map_mode": "max"})
    finest.load_state_dict(fitted.state_dict())
    finest.fitted = True
    _, amap_all = fitted.raw_forward(data["defects"][:2])
    _, amap_max = finest.raw_forward(data["defects"][:2])
    assert amap_max.shape == amap_all.shape == (2, SIZE, SIZE)
    assert not torch.allclose(amap_all, amap_max)


def test_save_load_round_trip(fitted: Csflow, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "cs.ckpt")


def test_input_size_not_a_multiple_of_the_scales() -> None:
    with pytest.raises(
        ValueError, match=r"image_size \(48, 48\) must be a multiple of 32 .* stride 8.*e\.g\. \[64, 64\]"
    ):
        Csflow(**{**TINY, "image_size": (48, 48)})


def test_feature_maps_too_small() -> None:
    # stride 32 at 64 px: the coarsest of three scales would be 0×0
    with pytest.raises(ValueError, match=r"must be a multiple of 128"):
        Csflow(**{**TINY, "layer": "layer4"})


def test_nan_stops_training_with_step(data: dict, tmp_path: Path) -> None:
    assert_nan_stops_with_step(Csflow(**TINY), tmp_path, data)
