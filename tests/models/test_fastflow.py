"""FastFlow: learns normal features' likelihood, finds pasted defects, checkpoints, fails clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.fastflow import Fastflow
from tests.models.flow_checks import assert_learns, assert_nan_stops_with_step
from tests.models.helpers import SIZE, assert_refuses_bad_fit_input, assert_round_trip, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {
    "pre_trained": False,
    "layers": ["layer1", "layer2"],
    "flow_steps": 2,
    "hidden_ratio": 0.5,
    "max_epochs": None,
    "max_steps": 24,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=32, n_val=16, n_test=12)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Fastflow:
    model = Fastflow(**TINY)
    model.fit(data["train"].split(8), data["val"].split(8), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "fastflow" in list_models()
    model = create_model("fastflow", pre_trained=False, image_size=[SIZE, SIZE])
    assert isinstance(model, Fastflow)
    cfg = model.config
    assert (cfg["flow_steps"], cfg["conv3x3_only"], cfg["hidden_ratio"]) == (8, False, 1.0)
    assert len(model.flows) == 3 and len(model.flows[0].module_list) == 8
    kernels = [block.subnet[0].kernel_size[0] for block in model.flows[0].module_list]
    assert kernels == [3, 1] * 4
    only3 = Fastflow(pre_trained=False, layers=["layer1"], flow_steps=2, conv3x3_only=True, image_size=(SIZE, SIZE))
    assert [b.subnet[0].kernel_size[0] for b in only3.flows[0].module_list] == [3, 3]


def test_learns_and_localises(fitted: Fastflow, data: dict) -> None:
    assert fitted.train_result is not None and fitted.train_result.steps == 24
    first, last = fitted.train_result.history[0]["loss"], fitted.train_result.history[-1]["loss"]
    assert last < first  # the likelihood of normal features went up
    assert_learns(fitted, data)
    pred = fitted(data["defects"])
    assert float(pred.score.mean()) > float(fitted(data["normal"]).score.mean())


def test_save_load_round_trip(fitted: Fastflow, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "ff.ckpt")
    for a, b in zip(fitted.flows.parameters(), loaded.flows.parameters(), strict=True):
        assert torch.equal(a, b)  # permutations included


def test_feature_maps_too_small() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer3' gives 1×1 feature maps .* at least 2×2"):
        Fastflow(pre_trained=False, image_size=(16, 16))


def test_nan_stops_training_with_step(data: dict, tmp_path: Path) -> None:
    assert_nan_stops_with_step(Fastflow(**{**TINY, "layers": ["layer1"]}), tmp_path, data)


def test_bad_fit_input() -> None:
    assert_refuses_bad_fit_input(Fastflow(**{**TINY, "layers": ["layer1"], "flow_steps": 1}))
