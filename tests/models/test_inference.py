"""prepare_for_inference: same scores in float32 + channels_last, close scores under bf16, checkpoints untouched."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from oddeye.models.base import load_model
from oddeye.models.image.padim import Padim
from oddeye.models.inference import inference_settings, prepare_for_inference
from tests.models.helpers import auroc, defect_data

SIZE = 32  # small and fast: this checks numerics, not learning

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=16, n_val=6, n_test=8, size=SIZE)


@pytest.fixture(scope="module")
def fitted(data: dict) -> Padim:
    torch.manual_seed(0)
    model = Padim(pre_trained=False, layers=["layer1", "layer2"], n_features=40, image_size=(SIZE, SIZE))
    return model.fit(data["train"].split(8), data["val"].split(6), progress=False)


def test_channels_last_float32_gives_the_same_scores(fitted: Padim, data: dict) -> None:
    images = torch.cat([data["normal"], data["defects"]])
    reference = fitted(images)
    prepared = prepare_for_inference(copy.deepcopy(fitted), "cpu", channels_last=True, precision="float32")
    settings = inference_settings(prepared)
    assert settings is not None and settings["channels_last"] and settings["precision"] == "float32"
    assert settings["backbones"] == ["TimmFeatureExtractor"]
    conv = prepared.feature_extractor.feature_extractor.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    out = prepared(images)
    torch.testing.assert_close(out.score, reference.score, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.anomaly_map, reference.anomaly_map, atol=1e-4, rtol=1e-4)


def test_bfloat16_backbone_keeps_the_ranking(fitted: Padim, data: dict) -> None:
    """bf16 features feed a float32 head: scores move a little, the normal/defect separation does not."""
    raw_n, _ = fitted.raw_forward(data["normal"])
    raw_d, _ = fitted.raw_forward(data["defects"])
    prepared = prepare_for_inference(copy.deepcopy(fitted), "cpu", precision="bfloat16")
    assert inference_settings(prepared)["precision"] == "bfloat16"
    features = prepared.feature_extractor(data["normal"][:2])
    assert all(f.dtype == torch.float32 for f in features.values())  # the head always gets float32
    bf_n, _ = prepared.raw_forward(data["normal"])
    bf_d, _ = prepared.raw_forward(data["defects"])
    scale = torch.cat([raw_n, raw_d]).abs().max()
    assert float((torch.cat([bf_n, bf_d]) - torch.cat([raw_n, raw_d])).abs().max() / scale) < 0.05
    assert abs(auroc(bf_n, bf_d) - auroc(raw_n, raw_d)) < 0.05


def test_checkpoint_is_unchanged_and_preparation_is_undone(fitted: Padim, data: dict, tmp_path) -> None:
    prepared = prepare_for_inference(copy.deepcopy(fitted), "cpu", precision="bfloat16")
    path = prepared.save(tmp_path / "padim.pt")
    assert set(torch.load(path, weights_only=True)["state_dict"]) == set(fitted.state_dict())
    loaded = load_model(path)
    assert inference_settings(loaded) is None
    torch.testing.assert_close(loaded(data["normal"]).score, fitted(data["normal"]).score, atol=1e-4, rtol=1e-4)
    again = prepare_for_inference(prepared, "cpu", precision="float32")  # re-preparing replaces the wrapper
    torch.testing.assert_close(again(data["normal"]).score, fitted(data["normal"]).score, atol=1e-4, rtol=1e-4)


def test_auto_is_float32_on_a_cpu_without_bf16(fitted: Padim, monkeypatch: pytest.MonkeyPatch) -> None:
    import oddeye.models.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference_settings(prepare_for_inference(copy.deepcopy(fitted), "cpu"))["precision"] == "float32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference_settings(prepare_for_inference(copy.deepcopy(fitted), "cpu"))["precision"] == "bfloat16"


def test_auto_is_float32_on_cuda() -> None:
    """An H100 ran the bench backbones no faster under autocast and bf16 cost DFKDE AUROC (RESULTS.md)."""
    from oddeye.models.inference import _resolve_precision

    assert _resolve_precision("auto", torch.device("cuda")) is None
    assert _resolve_precision("float16", torch.device("cuda")) == torch.float16


def test_bad_settings_name_the_allowed_values(fitted: Padim) -> None:
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'float32', 'bfloat16', 'float16'\]"):
        prepare_for_inference(fitted, "cpu", precision="int8")
    with pytest.raises(ValueError, match="'float16' is for CUDA"):
        prepare_for_inference(fitted, "cpu", precision="float16")
    with pytest.raises(ValueError, match="channels_last must be 'auto', True or False"):
        prepare_for_inference(fitted, "cpu", channels_last="yes")


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_folded_batch_norms_give_the_same_features(backbone: str) -> None:
    from oddeye.models.components import TimmFeatureExtractor
    from oddeye.models.inference import fold_batch_norms

    layer = "layer2" if backbone == "resnet18" else "blocks.2"
    extractor = TimmFeatureExtractor(backbone, [layer], pre_trained=False)
    net = extractor.feature_extractor
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():  # non-trivial statistics, or folding would be the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1, generator=gen)
            module.running_var.uniform_(0.5, 2, generator=gen)
    folded = fold_batch_norms(net, torch.rand(2, 3, 64, 64))
    assert folded is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    images = torch.rand(2, 3, 96, 80)
    reference = extractor(images)
    extractor.set_inference_net(folded)
    for name, value in extractor(images).items():
        torch.testing.assert_close(value, reference[name], atol=1e-4, rtol=1e-4)
    assert set(extractor.state_dict()) == set(net.state_dict(prefix="feature_extractor."))


def test_prepare_folds_batch_norms_unless_asked_not_to(fitted: Padim) -> None:
    prepared = prepare_for_inference(copy.deepcopy(fitted), "cpu", precision="float32")
    assert inference_settings(prepared)["folded_batch_norms"] == 1
    assert prepared.feature_extractor.__dict__["_inference_net"] is not None
    prepare_for_inference(prepared, "cpu", precision="float32", fold_bn=False)
    assert inference_settings(prepared)["folded_batch_norms"] == 0
    assert prepared.feature_extractor.__dict__["_inference_net"] is None
