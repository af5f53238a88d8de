"""EfficientAd: learns normal textures, flags defects; teacher files, the ImageNet penalty, quantile maps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, create_model, list_models
from oddeye.models.components.pdn import PDN, write_teacher_file
from oddeye.models.image.efficient_ad import EfficientAd
from tests.models.helpers import assert_refuses_bad_checkpoints, assert_round_trip, auroc, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

SIZE = 48  # the smallest PDN input with a useful map: 4×4 descriptors, 12×12 with pad_maps
TINY = {"teacher_out_channels": 16, "image_size": (SIZE, SIZE), "imagenet_dir": None}


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=32, n_val=10, n_test=10, size=SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> EfficientAd:
    torch.manual_seed(0)
    model = EfficientAd(**TINY, max_steps=25, lr=1e-3)  # 10x anomalib's lr: 25 steps instead of thousands
    model.fit(data["train"].split(4), data["val"].split(10), progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "efficient_ad" in list_models()
    model = create_model("efficient_ad", image_size=[64, 64])
    assert isinstance(model, EfficientAd)
    assert (model.teacher_out_channels, model.model_size.value, model.padding, model.pad_maps) == (
        384,
        "small",
        False,
        True,
    )
    assert (model.lr, model.weight_decay, model.batch_size, model.q_st, model.max_steps) == (
        1e-4,
        1e-5,
        1,
        0.999,
        70000,
    )
    assert model.student.out_channels == 768 and not any(p.requires_grad for p in model.teacher.parameters())
    (opt,), (sched,) = model.configure_optimizers()
    assert opt.defaults["weight_decay"] == 1e-5
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for m in (model.student, model.ae) for p in m.parameters()}
    model._total_steps = 100  # the learning rate drops tenfold after 95 % of the steps
    assert [sched.lr_lambdas[0](s) for s in (0, 94, 95, 99)] == [1.0, 1.0, 0.1, 0.1]
    medium = EfficientAd(model_size="M", teacher_out_channels=8, image_size=(SIZE, SIZE))
    assert len([m for m in medium.teacher.modules() if isinstance(m, torch.nn.Conv2d)]) == 6
    with pytest.raises(ValueError, match=r"model_size must be one of \['small', 'medium'\]"):
        EfficientAd(model_size="L")


def test_learns_defects_score_above_normal(fitted: EfficientAd, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"st", "ae", "stae"} <= history[0].keys()
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.9
    assert amap.shape == (10, SIZE, SIZE)


def test_quantile_normalisation_and_teacher_statistics(fitted: EfficientAd, data: dict) -> None:
    qa_st, qb_st, qa_ae, qb_ae = fitted.quantiles.tolist()
    assert qa_st < qb_st and qa_ae < qb_ae
    assert float(fitted.std.min()) > 0 and fitted.mean.shape == (1, 16, 1, 1)
    with torch.no_grad():
        teacher = fitted._teacher(data["train"])  # normalised over the training set
    assert abs(float(teacher.mean())) < 0.1 and abs(float(teacher.std()) - 1) < 0.1
    # On the held-out normal images the quantiles came from, qa maps to 0 and qb to 0.1.
    _, amap = fitted.raw_forward(data["val"])
    assert abs(float(torch.quantile(amap.flatten(), 0.9))) < 0.05


def test_padding_gives_the_same_map_size() -> None:
    for padding, pad_maps in ((True, False), (False, True), (False, False)):
        model = EfficientAd(**TINY, padding=padding, pad_maps=pad_maps)
        st, ae = model._maps(torch.rand(1, 3, SIZE, SIZE))
        assert st.shape == ae.shape == (1, 1, SIZE, SIZE)


def test_save_load_round_trip(fitted: EfficientAd, data: dict, tmp_path: Path) -> None:
    loaded = assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "e.ckpt")
    assert torch.equal(loaded.quantiles, fitted.quantiles)


def test_teacher_file_is_loaded_and_checked(data: dict, tmp_path: Path) -> None:
    teacher = PDN(16, "small")
    good = write_teacher_file(tmp_path / "teacher_s.pt", teacher)
    model = EfficientAd(**TINY, teacher_weights=str(good), max_steps=1)
    model.fit(data["train"][:4].split(4), progress=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.teacher.state_dict().values(), teacher.state_dict().values(), strict=True)
    )

    wrong = write_teacher_file(tmp_path / "teacher_m.pt", PDN(32, "medium"))
    model = EfficientAd(**TINY, teacher_weights=str(wrong), max_steps=1)
    with pytest.raises(FitError, match=r"model_size='medium' .*teacher_out_channels=32.*model_size='small'"):
        model.fit(data["train"][:4].split(4), progress=False)
    assert not model.fitted


def test_imagenet_dir_empty_or_absent(data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    model = EfficientAd(**{**TINY, "imagenet_dir": str(tmp_path / "empty")}, max_steps=1)
    with pytest.raises(FitError, match=r"imagenet_dir: image folder .*empty holds no images"):
        model.fit(data["train"][:4].split(4), progress=False)

    model = EfficientAd(**{**TINY, "imagenet_dir": str(tmp_path / "missing")}, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="oddeye.models.image.efficient_ad"):
        model.fit(data["train"][:4].split(4), progress=False)
    assert "does not exist: the ImageNet penalty uses 12 of scikit-image's bundled photos" in caplog.text
    assert model.fitted

    caplog.clear()
    model = EfficientAd(**TINY, max_steps=1)  # imagenet_dir None: no penalty, and it says so
    with caplog.at_level(logging.WARNING, logger="oddeye.models.image.efficient_ad"):
        model.fit(data["train"][:4].split(4), progress=False)
    assert "WITHOUT the ImageNet penalty" in caplog.text


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FitError, match="no images"):
        EfficientAd(**TINY, max_steps=1).fit([], progress=False)
    assert_refuses_bad_checkpoints(EfficientAd, tmp_path)


def test_nan_loss_stops_without_checkpoint(data: dict, tmp_path: Path) -> None:
    model = EfficientAd(**TINY, max_steps=3)
    model.ae.head[-1].bias.data.fill_(float("nan"))  # a corrupted autoencoder: NaN at the first step
    with pytest.raises(FitError, match=r"became nan at step 0 \(epoch 0\)"):
        model.fit(data["train"][:8].split(4), progress=False)
    assert not model.fitted
    with pytest.raises(RuntimeError, match="unfitted"):
        model.save(tmp_path / "never.ckpt")
