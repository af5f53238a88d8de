"""GLASS: global (gradient ascent) and local (Perlin texture) synthesis train a patch discriminator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.glass import Glass
from tests.models.helpers import assert_refuses_bad_checkpoints, assert_round_trip
from tests.models.helpers_synthesis import assert_learns, assert_nan_loss_stops, small_defect_data

SIZE = 64
TINY = {
    "backbone": "resnet18",
    "layers": ["layer1", "layer2"],
    "pre_trained": False,
    "pretrain_embed_dim": 64,
    "target_embed_dim": 64,
    "discriminator_hidden": 64,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return small_defect_data(SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Glass:
    torch.manual_seed(0)
    # 200 steps: AUROC 0.90, 0.95, 1.0 over seeds 0-2 at one thread; 100 steps gave 0.79, 0.78, 0.97
    model = Glass(**TINY, step=5, learning_rate=2e-3, max_epochs=None, max_steps=200, seed=0)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_seed_004_defaults() -> None:
    assert "glass" in list_models()
    model = create_model("glass", backbone="resnet18", pre_trained=False, image_size=[64, 64])
    assert isinstance(model, Glass)
    cfg = model.config
    expected = {
        "pretrain_embed_dim": 1536,
        "target_embed_dim": 1536,
        "patchsize": 3,
        "patchstride": 1,
        "pre_projection": 1,
        "discriminator_layers": 2,
        "discriminator_hidden": 1024,
        "learning_rate": 1e-4,
        "step": 20,
        "svd": 0,
        "gaussian_noise_std": 0.015,
        "radius_quantile": 0.75,
        "focal_loss_quantile_threshold": 0.5,
        "mining": True,
        "anomaly_source_path": None,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert model.layers == ["layer2", "layer3"]


def test_detects_defects_above_normal(fitted: Glass, data: dict) -> None:
    assert_learns(fitted, data)
    pred = fitted(data["defects"])
    assert pred.anomaly_map.shape == (10, SIZE, SIZE)
    assert float(fitted.center.abs().sum()) > 0  # the mean normal feature was computed


def test_save_load_round_trip(fitted: Glass, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "glass.ckpt")
    assert_refuses_bad_checkpoints(Glass, tmp_path)


def test_gradient_ascent_moves_features_within_the_band() -> None:
    torch.manual_seed(0)
    model = Glass(**TINY, step=10)
    model.train()
    true_feats = torch.randn(50, 64)
    center = torch.zeros(50, 64)
    gaus = model._global_synthesis(true_feats, center, torch.tensor(1.0))
    dist = (gaus - true_feats).norm(dim=1)
    # svd=0: every 5th step projects into [0.5, 1.0] around the normal feature.
    assert float(dist.min()) >= 0.5 - 1e-4 and float(dist.max()) <= 1.0 + 1e-4
    no_mining = Glass(**TINY, step=10, mining=False)._global_synthesis(true_feats, center, torch.tensor(1.0))
    assert float((no_mining - true_feats).std()) == pytest.approx(0.015, rel=0.1)  # Gaussian noise only
    sphere = Glass(**TINY, step=5, svd=1)
    moved = sphere._global_synthesis(true_feats, center, torch.tensor(2.0)).norm(dim=1)
    assert float(moved.min()) >= 2.0 - 1e-4 and float(moved.max()) <= 4.0 + 1e-4  # svd=1: r..2r from the centre


@pytest.mark.parametrize(("patchsize", "patchstride", "pre_projection", "svd", "quantile"), [(1, 2, 0, 1, 0.0)])
def test_other_parameters_train(
    data: dict, patchsize: int, patchstride: int, pre_projection: int, svd: int, quantile: float
) -> None:
    params = {**TINY, "patchsize": patchsize, "patchstride": patchstride, "pre_projection": pre_projection}
    model = Glass(**params, svd=svd, focal_loss_quantile_threshold=quantile, step=2, max_epochs=None, max_steps=2)
    assert model.patch_grid == (8, 8)  # layer1 of resnet18 at 64 px: 16×16, stride 2
    model.fit(data["train"][:8].split(4), progress=False)
    assert model(data["defects"][:2]).anomaly_map.shape == (2, SIZE, SIZE)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"invalid svd.*svd 0 or 1"):
        Glass(**TINY, svd=2)
    with pytest.raises(ValueError, match="focal_loss_quantile_threshold"):
        Glass(**TINY, focal_loss_quantile_threshold=1.0)


def test_empty_anomaly_source_path(tmp_path: Path, data: dict) -> None:
    model = Glass(**TINY, anomaly_source_path=str(tmp_path), max_epochs=None, max_steps=1)
    with pytest.raises(ValueError, match="holds no images"):
        model.fit(data["train"][:4].split(4), progress=False)
    assert not model.fitted


def test_nan_loss_stops_without_checkpoint(tmp_path: Path) -> None:
    assert_nan_loss_stops(Glass(**TINY, step=1, max_epochs=None, max_steps=3), SIZE, tmp_path)
