"""CFLOW: positional-conditional flows over fibers learn normality; checkpoints; clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.image.cflow import Cflow
from tests.models.flow_checks import assert_learns, assert_nan_stops_with_step
from tests.models.helpers import SIZE, assert_round_trip, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {
    "backbone": "resnet18",
    "layers": ["layer1", "layer2"],
    "pre_trained": False,
    "fiber_batch_size": 256,
    "condition_vector": 16,
    "coupling_blocks": 2,
    "lr": 1e-3,
    "max_epochs": None,
    "max_steps": 8,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=32, n_val=16, n_test=12)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Cflow:
    model = Cflow(**TINY)
    model.fit(data["train"].split(8), data["val"].split(8), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "cflow" in list_models()
    model = create_model("cflow", backbone="resnet18", pre_trained=False, image_size=[SIZE, SIZE])
    cfg = model.config
    assert cfg["layers"] == ["layer2", "layer3", "layer4"]
    assert (cfg["fiber_batch_size"], cfg["decoder"], cfg["condition_vector"]) == (64, "freia-cflow", 128)
    assert (cfg["coupling_blocks"], cfg["clamp_alpha"], cfg["permute_soft"], cfg["lr"]) == (8, 1.9, False, 1e-4)
    assert len(model.decoders) == 3 and len(model.decoders[0].module_list) == 8
    assert model.decoders[0].module_list[0].clamp == 1.9
    with pytest.raises(ValueError, match=r"decoder must be one of \['freia-cflow'\]"):
        Cflow(pre_trained=False, backbone="resnet18", decoder="glow", image_size=(SIZE, SIZE))
    with pytest.raises(ValueError, match="multiple of 4"):
        Cflow(pre_trained=False, backbone="resnet18", condition_vector=10, image_size=(SIZE, SIZE))


def test_learns_and_localises(fitted: Cflow, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert bool(torch.isfinite(fitted.ll_max).all()) and bool((fitted.ll_max != 0).any())
    assert_learns(fitted, data)


def test_scores_do_not_depend_on_the_batch(fitted: Cflow, data: dict) -> None:
    images = torch.cat([data["normal"][:2], data["defects"][:2]])
    together = fitted(images).score
    alone = torch.cat([fitted(images[i : i + 1]).score for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(fitted: Cflow, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "cf.ckpt")
    assert torch.equal(loaded.ll_max, fitted.ll_max)


def test_feature_maps_too_small() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer4' gives 1×1 feature maps .* at least 2×2"):
        Cflow(pre_trained=False, backbone="resnet18", image_size=(32, 32))


def test_too_few_fibers_for_the_fiber_batch(data: dict) -> None:
    model = Cflow(**{**TINY, "fiber_batch_size": 10_000})
    with pytest.raises(FitError, match=r"fewer than fiber_batch_size=10000"):
        model.fit([data["train"][:2]], progress=False)
    assert not model.fitted


def test_nan_stops_training_with_step(data: dict, tmp_path: Path) -> None:
    assert_nan_stops_with_step(Cflow(**{**TINY, "layers": ["layer1"]}), tmp_path, data)


def test_fiber_order_is_seeded_per_fit(data: dict) -> None:
    """Each fit shuffles its fibers from a generator seeded by ``seed``, whatever the global RNG did before."""
    model = Cflow(**TINY)
    batches = [data["train"]]
    orders = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model.on_train_start(batches)
        orders.append(torch.randperm(100, generator=model._generator))
    assert model._generator is not None and torch.equal(orders[0], orders[1])
