"""CFA: a k-means-initialised memory bank and a trained adaptor on generated textures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.cfa import Cfa
from tests.models.helpers import (
    SIZE,
    assert_refuses_bad_checkpoints,
    assert_refuses_bad_fit_input,
    assert_round_trip,
    auroc,
    defect_data,
    map_peak_distances,
)

PARAMS = {"backbone": "resnet18", "pre_trained": False, "epochs": 2, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=16)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Cfa:
    torch.manual_seed(0)  # the random backbone's weights
    model = Cfa(gamma_c=2, gamma_d=2, **PARAMS)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "cfa" in list_models()
    model = create_model("cfa", pre_trained=False, backbone="resnet18")
    assert (model.gamma_c, model.gamma_d, model.num_nearest_neighbors, model.num_hard_negative_features) == (1, 1, 3, 3)
    assert model.radius == 1e-5 and model.layers == ["layer1", "layer2", "layer3"]
    assert model.descriptor.conv.weight.shape[:2] == (448, 450)  # 64+128+256 channels plus two coordinates
    with pytest.raises(ValueError, match="gamma_c"):
        Cfa(gamma_c=0, **PARAMS)


def test_memory_bank_is_k_means_compressed(fitted: Cfa) -> None:
    patches = (SIZE // 4) ** 2  # layer1 of resnet18: stride 4
    assert fitted.memory_bank.features.shape == (patches // 2, 448 // 2)


def test_training_lowers_the_loss(fitted: Cfa) -> None:
    losses = fitted.loss_history
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_detects_and_localises_defects(fitted: Cfa, data: dict) -> None:
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.95
    assert amap.shape == (20, SIZE, SIZE)
    assert max(map_peak_distances(amap, data["centres"])) <= 12
    assert float((fitted(data["defects"]).score > 0.5).float().mean()) >= 0.9
    assert float((fitted(data["normal"]).score < 0.5).float().mean()) >= 0.8


def test_fit_is_reproducible(data: dict) -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same random backbone; the adaptor and the shuffling are seeded by the model
        model = Cfa(**{**PARAMS, "epochs": 1})
        model.fit([data["train"][:4]], [data["val"][:4]], progress=False)
        runs.append(model.raw_forward(data["defects"][:2])[0])
    torch.testing.assert_close(runs[0], runs[1])


def test_save_load_round_trip(fitted: Cfa, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "cfa.ckpt")
    assert torch.equal(loaded.descriptor.conv.weight, fitted.descriptor.conv.weight)


def test_bad_input(tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(Cfa(**PARAMS))
    assert_refuses_bad_checkpoints(Cfa, tmp_path)
