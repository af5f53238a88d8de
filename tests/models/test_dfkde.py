"""DFKDE: a KDE of PCA-reduced pooled features; image-level scores on generated textures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.image.dfkde import Dfkde
from tests.models.helpers import (
    SIZE,
    assert_refuses_bad_checkpoints,
    assert_refuses_bad_fit_input,
    assert_round_trip,
    auroc,
    defect_data,
)

# Global pooling of random features sees a small defect weakly: mid-level layers and more images help.
PARAMS = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pre_trained": False, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=96)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Dfkde:
    torch.manual_seed(0)  # the random backbone's weights
    model = Dfkde(**PARAMS)
    model.fit(data["train"].split(32), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "dfkde" in list_models()
    model = create_model("dfkde", pre_trained=False)
    assert model.layers == ["layer4"] and model.backbone == "resnet18"
    clf = model.classifier
    assert (clf.n_pca_components, clf.feature_scaling_method.value, clf.max_training_points) == (16, "scale", 40000)
    with pytest.raises(ValueError, match="feature_scaling_method"):
        Dfkde(feature_scaling_method="unit", **PARAMS)


def test_detects_defects_image_level(fitted: Dfkde, data: dict) -> None:
    normal, nmap = fitted.raw_forward(data["normal"])
    anomalous, _ = fitted.raw_forward(data["defects"])
    assert nmap is None
    assert fitted.classifier.kde_model.dataset.shape == (96, 16)
    assert auroc(normal, anomalous) >= 0.9
    pred_normal, pred_defects = fitted(data["normal"]), fitted(data["defects"])
    assert pred_defects.anomaly_map is None
    assert float((pred_normal.score < 0.5).float().mean()) >= 0.8
    assert float((pred_defects.score > 0.5).float().mean()) >= 0.6


def test_save_load_round_trip(fitted: Dfkde, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "dfkde.ckpt")


def test_bad_input(data: dict, tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(Dfkde(**PARAMS))
    assert_refuses_bad_checkpoints(Dfkde, tmp_path)
    with pytest.raises(FitError, match="more than n_pca_components=16"):
        Dfkde(**PARAMS).fit([data["train"][:10]], progress=False)
