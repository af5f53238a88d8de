"""Reverse Distillation: the decoder learns to rebuild the encoder on normal textures, not on defects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.image.reverse_distillation import (
    AnomalyMapGenerationMode,
    ReverseDistillation,
    reverse_distillation_loss,
)
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
    return defect_data(n_train=32, n_val=10, n_test=10)


@pytest.fixture(scope="module")
def fitted(data: dict) -> ReverseDistillation:
    torch.manual_seed(0)
    model = ReverseDistillation(**TINY, max_epochs=4)
    model.fit(data["train"].split(8), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "reverse_distillation" in list_models()
    model = create_model("reverse_distillation", backbone="resnet18", pre_trained=False)
    assert isinstance(model, ReverseDistillation)
    assert model.layers == ["layer1", "layer2", "layer3"]
    assert model.anomaly_map_mode == AnomalyMapGenerationMode.ADD
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 0.005 and opt.defaults["betas"] == (0.5, 0.99)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for m in (model.decoder, model.bottleneck) for p in m.parameters()}
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_decoder_mirrors_any_backbone() -> None:
    model = ReverseDistillation(backbone="efficientnet_lite0", layers=["blocks.1", "blocks.2"], pre_trained=False)
    encoded, decoded = model._features(torch.rand(1, 3, 64, 64))
    assert [e.shape for e in encoded] == [d.shape for d in decoded]
    with pytest.raises(ValueError, match="shallow to deep"):
        ReverseDistillation(backbone="resnet18", layers=["layer2", "layer1"], pre_trained=False)


def test_anomaly_map_mode_checked() -> None:
    with pytest.raises(ValueError, match=r"anomaly_map_mode must be one of \['add', 'multiply'\]"):
        ReverseDistillation(**TINY, anomaly_map_mode="max")
    assert ReverseDistillation(**TINY, anomaly_map_mode="multiply").config["anomaly_map_mode"] == "multiply"


def test_loss_is_zero_for_identical_features() -> None:
    e = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4)]
    assert float(reverse_distillation_loss(e, e)) == pytest.approx(0.0, abs=1e-6)
    assert float(reverse_distillation_loss(e, [-x for x in e])) == pytest.approx(4.0, abs=1e-5)


def test_learns_defects_score_above_normal(fitted: ReverseDistillation, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.75  # 4 short epochs on a random encoder: clearly better than chance
    assert float(anomalous.mean()) > float(normal.mean())
    assert amap.shape == (10, SIZE, SIZE)
    fitted.anomaly_map_mode = AnomalyMapGenerationMode.MULTIPLY
    try:
        multiplied, _ = fitted.raw_forward(data["defects"])
    finally:
        fitted.anomaly_map_mode = AnomalyMapGenerationMode.ADD
    assert float(multiplied.max()) < float(anomalous.max())  # products of values < 1 are smaller than sums


def test_save_load_round_trip(fitted: ReverseDistillation, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "rd.ckpt")


def test_bad_input(tmp_path: Path) -> None:
    assert_refuses_bad_fit_input(ReverseDistillation(**TINY, max_epochs=1))
    assert_refuses_bad_checkpoints(ReverseDistillation, tmp_path)


def test_nan_loss_stops_without_checkpoint(data: dict, tmp_path: Path) -> None:
    model = ReverseDistillation(**TINY, max_epochs=1)
    model.decoder.blocks[-1].body[-1].bias.data.fill_(float("nan"))  # a corrupted decoder: NaN at the first step
    with pytest.raises(FitError, match=r"at step 0 \(epoch 0\); last finite loss nan"):
        model.fit(data["train"][:8].split(8), progress=False)
    assert not model.fitted
