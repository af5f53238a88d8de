"""DFM: PCA of pooled features of generated textures; reconstruction error and likelihood scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.dfm import Dfm
from tests.models.helpers import (
    SIZE,
    assert_refuses_bad_checkpoints,
    assert_refuses_bad_fit_input,
    assert_round_trip,
    auroc,
    defect_data,
)

PARAMS = {"backbone": "resnet18", "pre_trained": False, "pooling_kernel_size": 2, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=48)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Dfm:
    torch.manual_seed(0)  # the random backbone's weights
    model = Dfm(**PARAMS)
    model.fit(data["train"].split(16), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "dfm" in list_models()
    model = create_model("dfm", pre_trained=False, backbone="resnet18")
    assert (model.layer, model.pooling_kernel_size, model.score_type) == ("layer3", 4, "fre")
    assert model.pca_model.n_components == 0.97
    with pytest.raises(ValueError, match=r"score_type must be one of \['fre', 'nll'\]"):
        Dfm(score_type="mse", **PARAMS)


def test_pca_keeps_the_variance_level(fitted: Dfm) -> None:
    pca = fitted.pca_model
    assert pca.singular_vectors.shape[0] == 256 * (SIZE // 16 // 2) ** 2  # layer3 channels × pooled grid
    assert 1 <= pca.num_components < 48


def test_fre_detects_defects_with_a_map(fitted: Dfm, data: dict) -> None:
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.95
    assert amap.shape == (20, SIZE, SIZE)
    assert float((fitted(data["defects"]).score > 0.5).float().mean()) >= 0.9
    assert float((fitted(data["normal"]).score < 0.5).float().mean()) >= 0.8


def test_nll_scores_image_level(fitted: Dfm, data: dict) -> None:
    model = Dfm(**{**PARAMS, "score_type": "nll"})
    model.load_state_dict(fitted.state_dict())
    model.fitted = True
    normal, nmap = model.raw_forward(data["normal"])
    anomalous, _ = model.raw_forward(data["defects"])
    assert nmap is None
    assert auroc(normal, anomalous) >= 0.8
    assert float(anomalous.mean()) > float(normal.mean())


def test_save_load_round_trip(fitted: Dfm, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "dfm.ckpt")


def test_bad_input(tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(Dfm(**PARAMS))
    assert_refuses_bad_checkpoints(Dfm, tmp_path)
