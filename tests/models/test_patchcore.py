"""PatchCore: learns a coreset memory bank from generated textures, finds pasted defects, checkpoints safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models
from oddeye.models.image.patchcore import Patchcore
from tests.models.helpers import (
    SIZE,
    assert_refuses_bad_checkpoints,
    assert_refuses_bad_fit_input,
    assert_round_trip,
    auroc,
    defect_data,
    map_peak_distances,
)

PARAMS = {"backbone": "resnet18", "pre_trained": False, "image_size": (SIZE, SIZE)}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=48)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Patchcore:
    torch.manual_seed(0)  # the random backbone's weights
    model = Patchcore(**PARAMS)
    model.fit(data["train"].split(16), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "patchcore" in list_models()
    model = create_model("patchcore", pre_trained=False, backbone="resnet18")
    assert model.layers == ["layer2", "layer3"]
    assert model.coreset_sampling_ratio == 0.1 and model.num_neighbors == 9
    assert model.config["backbone"] == "resnet18"
    with pytest.raises(ValueError, match="coreset_sampling_ratio"):
        Patchcore(coreset_sampling_ratio=0, **PARAMS)


def test_memory_bank_is_the_coreset(fitted: Patchcore, data: dict) -> None:
    patches = data["train"].shape[0] * (SIZE // 8) ** 2  # layer2 of resnet18: stride 8
    assert fitted.memory_bank.features.shape == (int(patches * 0.1), 128 + 256)


def test_detects_and_localises_defects(fitted: Patchcore, data: dict) -> None:
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.95
    assert amap.shape == (20, SIZE, SIZE)
    assert max(map_peak_distances(amap, data["centres"])) <= 12
    pred = fitted(data["defects"])
    assert bool((pred.score > 0.5).all())
    assert float((fitted(data["normal"]).score < 0.5).float().mean()) >= 0.8


def test_image_score_is_reweighted_worst_patch(fitted: Patchcore, data: dict) -> None:
    score, _ = fitted.raw_forward(data["defects"][:4])
    single = Patchcore(**{**PARAMS, "num_neighbors": 1})
    single.load_state_dict(fitted.state_dict())
    worst, _ = single.raw_forward(data["defects"][:4])
    assert bool((score < worst).all()) and bool((score > 0).all())  # a weight in (0, 1) times the worst patch


def test_batches_score_independently(fitted: Patchcore, data: dict) -> None:
    images = data["defects"][:4]
    together = fitted(images).score
    alone = torch.cat([fitted(images[i : i + 1]).score for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(fitted: Patchcore, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:3], data["defects"][:3]]), tmp_path / "pc.ckpt")
    assert torch.equal(loaded.memory_bank.features, fitted.memory_bank.features)


def test_bad_input(tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(Patchcore(**PARAMS))
    assert_refuses_bad_checkpoints(Patchcore, tmp_path)
    with pytest.raises(RuntimeError, match="not fitted"):
        Patchcore(**PARAMS)(torch.rand(1, 3, SIZE, SIZE))
