"""GANomaly: adversarially trained encoder-decoder-encoder; latent distance scores defects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.ganomaly import Ganomaly
from tests.models.helpers import assert_refuses_bad_checkpoints, assert_round_trip
from tests.models.helpers_synthesis import assert_learns, assert_nan_loss_stops, small_defect_data

SIZE = 32
TINY = {"n_features": 8, "latent_vec_size": 16, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return small_defect_data(SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Ganomaly:
    torch.manual_seed(0)
    model = Ganomaly(**TINY, max_epochs=None, max_steps=150, seed=0)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "ganomaly" in list_models()
    model = create_model("ganomaly", image_size=[64, 64])
    assert isinstance(model, Ganomaly)
    cfg = model.config
    assert (cfg["n_features"], cfg["latent_vec_size"], cfg["extra_layers"], cfg["add_final_conv_layer"]) == (
        64,
        100,
        0,
        True,
    )
    assert (cfg["wadv"], cfg["wcon"], cfg["wenc"], cfg["lr"], cfg["beta1"], cfg["beta2"]) == (
        1,
        50,
        1,
        2e-4,
        0.5,
        0.999,
    )


def test_detects_defects_above_normal(fitted: Ganomaly, data: dict) -> None:
    assert fitted.train_result is not None and "discriminator" in fitted.train_result.history[-1]
    assert_learns(fitted, data, min_auroc=0.7)
    assert fitted(data["defects"]).anomaly_map is None  # an image score only, as in anomalib


def test_save_load_round_trip(fitted: Ganomaly, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "ganomaly.ckpt")
    assert_refuses_bad_checkpoints(Ganomaly, tmp_path)


@pytest.mark.parametrize(("extra_layers", "final_conv"), [(1, True), (0, False)])
def test_architecture_options(data: dict, extra_layers: int, final_conv: bool) -> None:
    model = Ganomaly(**TINY, extra_layers=extra_layers, add_final_conv_layer=final_conv, max_epochs=None, max_steps=2)
    model.fit(data["train"][:8].split(4), progress=False)
    fake, latent_i, latent_o = model._generate(data["normal"][:2])
    assert fake.shape == (2, 3, SIZE, SIZE) and latent_i.shape == latent_o.shape
    assert model(data["normal"][:2]).score.shape == (2,)


def test_image_size_must_fit_the_network() -> None:
    with pytest.raises(ValueError, match=r"power-of-two side"):
        Ganomaly(**{**TINY, "image_size": (96, 96)})
    with pytest.raises(ValueError, match=r"square"):
        Ganomaly(**{**TINY, "image_size": (32, 64)})


def test_nan_loss_stops_without_checkpoint(tmp_path: Path) -> None:
    assert_nan_loss_stops(Ganomaly(**TINY, max_epochs=None, max_steps=3), SIZE, tmp_path)
