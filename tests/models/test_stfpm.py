"""STFPM: the student learns the teacher's features on normal textures and misses them on defects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.image.stfpm import Stfpm, stfpm_layer_maps, stfpm_loss
from tests.models.helpers import (
    SIZE,
    assert_refuses_bad_checkpoints,
    assert_refuses_bad_fit_input,
    assert_round_trip,
    auroc,
    defect_data,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {"backbone": "resnet18", "layers": ["layer1", "layer2"], "pre_trained": False, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=64, n_val=10, n_test=10)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Stfpm:
    torch.manual_seed(0)
    model = Stfpm(**TINY, max_epochs=4)
    model.fit(data["train"].split(16), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "stfpm" in list_models()
    model = create_model("stfpm", pre_trained=False)
    assert isinstance(model, Stfpm)
    assert model.layers == ["layer1", "layer2", "layer3"] and model.backbone == "resnet18"
    assert (model.lr, model.momentum, model.weight_decay, model.max_epochs) == (0.4, 0.9, 0.001, 100)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.student.parameters()}
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_loss_and_maps_are_zero_for_identical_features() -> None:
    t = {"a": torch.rand(2, 8, 4, 4), "b": torch.rand(2, 16, 2, 2)}
    assert float(stfpm_loss(t, t)) == 0.0
    s = {"a": -t["a"], "b": t["b"] * 3.0}  # scale does not matter: features are normalised
    assert float(stfpm_loss(t, s)) > 0
    maps = stfpm_layer_maps(t, s, (8, 8))
    assert maps[0].shape == (2, 1, 8, 8) and float(maps[1].abs().max()) < 1e-6


def test_learns_defects_score_above_normal(fitted: Stfpm, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < history[0]["loss"]
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.9
    assert amap.shape == (10, SIZE, SIZE)
    pred = fitted(data["defects"])
    assert bool((pred.score[::2] > 0.5).all())  # the bright blobs; thin scratches may stay under 0.5 this early
    assert float(pred.score.mean()) > float(fitted(data["normal"]).score.mean())


def test_save_load_round_trip(fitted: Stfpm, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "s.ckpt")
    assert loaded.config["layers"] == ["layer1", "layer2"]


def test_bad_input(tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(Stfpm(**TINY, max_epochs=1))
    assert_refuses_bad_checkpoints(Stfpm, tmp_path)


def test_nan_loss_stops_without_checkpoint(data: dict, tmp_path: Path) -> None:
    model = Stfpm(**TINY, max_epochs=2, lr=1e30)  # the first step throws the student's weights to inf
    with pytest.raises(FitError, match=r"became nan at step 1 \(epoch 0\); last finite loss \d"):
        model.fit(data["train"][:16].split(8), progress=False)
    assert not model.fitted
    with pytest.raises(RuntimeError, match="unfitted"):
        model.save(tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()
