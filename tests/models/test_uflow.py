"""U-Flow: the U-shaped flow learns normality; the a-contrario (NFA) test labels frames without labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.uflow import Uflow
from tests.models.flow_checks import assert_learns, assert_nan_stops_with_step
from tests.models.helpers import SIZE, assert_round_trip, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {
    "backbone": "resnet18",
    "layers": ["layer1", "layer2", "layer3"],  # 16×16, 8×8, 4×4 at 64 px
    "pre_trained": False,
    "flow_steps": 2,
    "affine_subnet_channels_ratio": 0.5,
    "max_epochs": None,
    "max_steps": 24,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=32, n_val=16, n_test=12)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Uflow:
    model = Uflow(**TINY)
    model.fit(data["train"].split(8), data["val"].split(8), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "uflow" in list_models()
    model = create_model("uflow", pre_trained=False, image_size=[SIZE, SIZE])
    cfg = model.config
    assert (cfg["flow_steps"], cfg["affine_clamp"], cfg["affine_subnet_channels_ratio"], cfg["permute_soft"]) == (
        4,
        2.0,
        1.0,
        False,
    )
    assert Uflow.nfa_threshold
    z, _ = model._latents(torch.rand(2, 3, SIZE, SIZE))
    # finest first; coarser latents keep part of their scale's channels (the rest went up the U)
    assert [tuple(t.shape[-2:]) for t in z] == [(16, 16), (8, 8), (4, 4)]


def test_learns_and_localises(fitted: Uflow, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert_learns(fitted, data)


def test_nfa_on_standard_normal_latents_finds_only_the_planted_blob() -> None:
    model = Uflow(**{**TINY, "layers": ["layer1", "layer2"]})
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 32, 16, 16, generator=g), torch.randn(4, 32, 8, 8, generator=g)]
    frame, amap = model.log_nfa_from_latents(z, (SIZE, SIZE))
    assert amap.shape == (4, SIZE, SIZE)
    assert bool((frame >= 0).all()), frame  # normal latents: no detection
    z[0][1, :, 5:10, 5:10] *= 3.0  # one image gets a patch of unlikely latents
    frame, amap = model.log_nfa_from_latents(z, (SIZE, SIZE))
    assert bool(frame[1] < 0) and bool((frame[[0, 2, 3]] >= 0).all()), frame
    y, x = divmod(int(amap[1].argmin()), SIZE)
    assert 16 <= y <= 44 and 16 <= x <= 44  # the blob sits at latent rows/cols 5-9 (×4 px)


def test_labels_come_from_the_nfa_test(fitted: Uflow, data: dict) -> None:
    images = torch.cat([data["normal"], data["defects"]])
    pred = fitted(images)
    frame, amap = fitted.log_nfa(images)
    assert amap.shape == (len(images), SIZE, SIZE)
    assert torch.equal(pred.label, frame < 0)
    n = len(data["normal"])
    assert float(pred.label[:n].float().mean()) <= float(pred.label[n:].float().mean())
    # after a short training the test is not yet sharp enough to fire on 64-px frames, but the
    # evidence already ranks: defective frames are less likely under the a-contrario null
    assert float(frame[n:].mean()) < float(frame[:n].mean()), frame


def test_save_load_round_trip(fitted: Uflow, data: dict, tmp_path: Path) -> None:
    images = torch.cat([data["normal"][:2], data["defects"][:2]])
    loaded = assert_round_trip(fitted, images, tmp_path / "uf.ckpt")
    assert torch.equal(loaded(images).label, fitted(images).label)


def test_feature_maps_too_small() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer3' gives 1×1 feature maps .* at least 2×2"):
        Uflow(**{**TINY, "image_size": (16, 16)})
    with pytest.raises(ValueError, match=r"each layer at half the previous one's size"):
        Uflow(**{**TINY, "layers": ["layer1", "layer3"]})


def test_nan_stops_training_with_step(data: dict, tmp_path: Path) -> None:
    assert_nan_stops_with_step(Uflow(**{**TINY, "layers": ["layer1", "layer2"]}), tmp_path, data)
