"""GeneralAD: learns from pseudo-anomalies on the shared trainer, every fake-feature strategy, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import create_model, list_models, model_params
from oddeye.models.image.general_ad import FAKE_FEATURE_TYPES, GeneralAD
from tests.models.helpers import SIZE, assert_round_trip, auroc, defect_data, map_peak_distances

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=48, n_val=8, n_test=16)


@pytest.fixture(scope="module")
def fitted(data: dict) -> GeneralAD:
    torch.manual_seed(0)
    model = GeneralAD(
        backbone="resnet18",
        layers=["layer2"],  # stride 8: an 8 x 8 patch grid at 64 px
        pre_trained=False,
        hidden_dim=128,
        lr=2e-3,
        epochs=20,
        noise_std=1.0,  # the test texture varies little: bigger perturbations teach faster
        dsc_dropout=0.0,
        top_k=4,
        image_size=(SIZE, SIZE),
    )
    model.fit(data["train"].split(16), data["val"].split(8), progress=False)
    return model


@pytest.fixture(scope="module")
def tiny_vit() -> GeneralAD:
    torch.manual_seed(0)
    return GeneralAD(
        backbone="vit_tiny_patch16_224",
        layers=[1, 2],
        pre_trained=False,
        hidden_dim=32,
        dsc_heads=4,
        epochs=1,
        num_fake_patches=5,
        fake_feature_type="copy_out_and_attn",
        image_size=(32, 48),
    )


def test_registered_with_the_seed_defaults() -> None:
    assert "general_ad" in list_models()
    defaults = model_params("general_ad")
    expected = {
        "backbone": "vit_large_patch14_dinov2.lvd142m",
        "layers": (24,),
        "hidden_dim": 2048,
        "lr": 0.0005,
        "lr_decay_factor": 0.2,
        "weight_decay": 1e-05,
        "epochs": 160,
        "noise_std": 0.25,
        "dsc_layers": 1,
        "dsc_heads": 4,
        "dsc_dropout": 0.1,
        "num_fake_patches": -1,
        "fake_feature_type": "random",
        "top_k": 10,
        "pre_trained": True,
    }
    assert {k: defaults[k] for k in expected} == expected
    model = create_model("general_ad", backbone="resnet18", layers=["layer3"], pre_trained=False, image_size=[64, 64])
    assert model.grid == (4, 4) and model.top_k == 10 and model.num_fake_patches == 16


def test_learns_defects_above_normal(fitted: GeneralAD, data: dict) -> None:
    history = fitted.train_result.history
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, amap = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.85
    assert amap.shape == (16, SIZE, SIZE)
    assert sorted(map_peak_distances(amap, data["centres"]))[8] <= 16  # most maps peak at their defect


def test_image_score_is_mean_of_top_k_patch_scores(fitted: GeneralAD, data: dict) -> None:
    images = data["defects"][:3]
    features, _ = fitted._patch_features(images)
    with torch.no_grad():
        logits = fitted.discriminator(features)
    score, _ = fitted.raw_forward(images)
    expected = logits.sort(dim=1, descending=True).values[:, :4].mean(1)
    torch.testing.assert_close(score, expected)


def test_save_load_round_trip(fitted: GeneralAD, data: dict, tmp_path: Path) -> None:
    assert_round_trip(fitted, torch.cat([data["normal"][:2], data["defects"][:2]]), tmp_path / "general_ad.pt")


def test_cosine_schedule_ends_at_lr_times_decay() -> None:
    model = GeneralAD(backbone="resnet18", layers=["layer3"], pre_trained=False, epochs=5, lr=0.01, image_size=[64, 64])
    (opt,), (schedule,) = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-05
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.01) and lrs == sorted(lrs, reverse=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.2)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.discriminator.parameters()}


@pytest.mark.parametrize("kind", ["random", "attn", "copy_out", "shuffle", "randshuffle"])
def test_each_fake_strategy_alters_exactly_its_patches(tiny_vit: GeneralAD, kind: str) -> None:
    torch.manual_seed(1)
    features, attn = tiny_vit._patch_features(torch.rand(3, 3, 32, 48), attention=True)
    assert features.shape == (3, 6, 384) and attn.shape == (3, 3, 6)  # 2 x 3 patches, 2 blocks of 192
    fake, mask = tiny_vit._fake(kind, features, attn)
    assert mask.any(1).all() and (mask.sum(1) <= 5).all()
    changed = (fake != features).any(-1)
    assert not (changed & ~mask).any()  # nothing outside the mask moves
    if kind in ("random", "attn"):
        assert changed[mask].all()
    else:  # copied or shuffled patches are patches of the same image
        for i in range(3):
            for row in fake[i, mask[i]]:
                assert (features[i] == row).all(-1).any()
    if kind in ("attn", "copy_out", "shuffle"):  # the most attended patches of some head
        for i in range(3):
            k = int(mask[i].sum())
            tops = [set(attn[i, h].topk(k).indices.tolist()) for h in range(3)]
            assert set(mask[i].nonzero().flatten().tolist()) in tops


@pytest.mark.parametrize("kind", FAKE_FEATURE_TYPES)
def test_every_fake_feature_type_trains(kind: str, tiny_vit: GeneralAD) -> None:
    tiny_vit.fake_feature_type = kind
    tiny_vit.uses_attention = True
    tiny_vit.on_train_start([])
    losses = tiny_vit.training_step(torch.rand(2, 3, 32, 48), 0)
    parts = kind.split("_and_")
    assert set(losses) == {"normal", "noise", *parts, "loss"}
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad
    losses["loss"].backward()
    assert tiny_vit.discriminator.head.weight.grad is not None
    tiny_vit.discriminator.zero_grad()


def test_bad_parameters_are_clear_errors() -> None:
    cnn = {"backbone": "resnet18", "layers": ["layer2"], "pre_trained": False, "image_size": [64, 64]}
    with pytest.raises(ValueError, match=r"fake_feature_type must be one of \['random', 'attn'"):
        GeneralAD(**cnn, fake_feature_type="noise")
    allowed = r"\['random', 'randshuffle', 'randshuffle_and_random'\]"
    with pytest.raises(ValueError, match=rf"class token's attention.*{allowed}"):
        GeneralAD(**cnn, fake_feature_type="attn")
    with pytest.raises(ValueError, match="top_k must be -1"):
        GeneralAD(**cnn, top_k=0)
    with pytest.raises(ValueError, match=r"not a multiple of .*patch size \(16, 16\)"):
        GeneralAD(backbone="vit_tiny_patch16_224", layers=[1], pre_trained=False, image_size=[40, 48])
