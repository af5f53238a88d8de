"""DSR: VQ stage on natural photos and the user's images, latent-space defects, then the upsampling stage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.image.dsr import Dsr
from tests.models.helpers import assert_refuses_bad_checkpoints, assert_round_trip
from tests.models.helpers_synthesis import assert_learns, assert_nan_loss_stops, small_defect_data

SIZE = 32
TINY = {
    "embedding_dim": 16,
    "num_embeddings": 64,
    "num_hiddens": 16,
    "num_residual_hiddens": 8,
    "base_width": 8,
    "image_size": (SIZE, SIZE),
}


@pytest.fixture(scope="module")
def data() -> dict:
    return small_defect_data(SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Dsr:
    torch.manual_seed(0)
    model = Dsr(**TINY, learning_rate=2e-3, max_epochs=None, max_steps=60, seed=0)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "dsr" in list_models()
    model = create_model("dsr", **{**TINY, "image_size": [64, 64]})
    assert isinstance(model, Dsr)
    assert model.config["latent_anomaly_strength"] == 0.2 and model.config["upsampling_train_ratio"] == 0.7
    defaults = Dsr.__init__.__wrapped__.__defaults__  # anomalib's DsrModel defaults
    assert defaults[2:7] == (128, 4096, 128, 2, 64)


def test_three_stages(fitted: Dsr, data: dict) -> None:
    # 60 steps: 18 VQ steps, 29 main steps (70% of the rest), 13 upsampling steps.
    assert fitted._phase_steps == (18, 47)
    history = fitted.train_result.history
    assert "vq_recon" in history[0] and "upsampling_focal" in history[-1]
    assert fitted(data["defects"]).anomaly_map.shape == (10, SIZE, SIZE)


@pytest.mark.xfail(
    reason="DSR does not learn in a test-sized budget: even with natural photos in the VQ stage, a VQ model "
    "trained from scratch for tens of steps (no ImageNet weights here) collapses its features onto a few "
    "nearby codes and its general decoder renders swapped codes almost like the normal ones (at most 0.03 "
    "mean change), so the detection module gets little signal; AUROC 0.3-0.6 at 60 steps, 0.5-0.6 at 200. "
    "See the DSR notes in issue 17",
    strict=False,
)
def test_detects_defects_above_normal(fitted: Dsr, data: dict) -> None:
    assert_learns(fitted, data)


def test_latent_anomalies_change_only_masked_codes(fitted: Dsr, data: dict) -> None:
    enc = fitted.discrete.encode(data["normal"][:2])
    mask = torch.zeros(2, 1, *enc["q_top"].shape[-2:])
    mask[0, 0, :2, :2] = 1
    with torch.no_grad():
        out = fitted._latent_anomalies(fitted.discrete.vq_top, enc["top"], mask)
    changed = (out - enc["q_top"]).abs().sum(dim=1) > 1e-6
    assert bool(changed[0, :2, :2].all()) and not bool(changed[0, 2:].any()) and not bool(changed[1].any())


def test_save_load_round_trip(fitted: Dsr, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "dsr.ckpt")
    assert_refuses_bad_checkpoints(Dsr, tmp_path)


def test_vq_stage_on_another_folder(tmp_path: Path, data: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        Dsr(**TINY, max_epochs=None, max_steps=2).fit(data["train"][:8].split(4), progress=False)
    assert "scikit-image's bundled photos" in caplog.text  # the default general images
    caplog.clear()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    model = Dsr(**TINY, vq_source_path=str(tmp_path), max_epochs=None, max_steps=4)
    with caplog.at_level(logging.INFO):
        model.fit(data["train"][:8].split(4), progress=False)
    assert "no ImageNet-pretrained VQ model" in caplog.text and str(tmp_path) in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FitError, match="holds no images"):
        Dsr(**TINY, vq_source_path=str(empty), max_epochs=None, max_steps=4).fit(data["train"][:4].split(4))


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"divisible by 32.*\[64, 32\]"):
        Dsr(**{**TINY, "image_size": (70, 40)})
    with pytest.raises(ValueError, match="latent_anomaly_strength"):
        Dsr(**TINY, latent_anomaly_strength=0)
    with pytest.raises(ValueError, match="upsampling_train_ratio"):
        Dsr(**TINY, upsampling_train_ratio=1.0)


def test_empty_anomaly_source_path(tmp_path: Path, data: dict) -> None:
    model = Dsr(**TINY, anomaly_source_path=str(tmp_path), max_epochs=None, max_steps=3)
    with pytest.raises(ValueError, match="holds no images"):
        model.fit(data["train"][:4].split(4), progress=False)


def test_nan_loss_stops_without_checkpoint(tmp_path: Path) -> None:
    assert_nan_loss_stops(Dsr(**TINY, max_epochs=None, max_steps=3), SIZE, tmp_path)
