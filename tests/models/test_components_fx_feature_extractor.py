"""The torch.fx feature extractor: node names, torchvision and timm models, local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision

from oddeye.models.components import TorchFXFeatureExtractor, WeightsUnavailableError


def test_torchvision_nodes_shapes_and_order() -> None:
    fe = TorchFXFeatureExtractor("resnet18", ["layer2", "layer1.0.relu_1"])
    out = fe(torch.rand(2, 3, 64, 64))
    assert list(out) == ["layer2", "layer1.0.relu_1"]
    assert out["layer2"].shape == (2, 128, 8, 8) and out["layer1.0.relu_1"].shape == (2, 64, 16, 16)
    assert fe.dryrun((64, 64)) == {"layer2": (128, 8, 8), "layer1.0.relu_1": (64, 16, 16)}


def test_timm_model_and_module_instance() -> None:
    fe = TorchFXFeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"])
    assert fe.dryrun((64, 64)) == {"blocks.2": (40, 8, 8), "blocks.4": (112, 4, 4)}
    model = timm.create_model("resnet18", pretrained=False).eval()
    fe = TorchFXFeatureExtractor(model, ["layer1"])
    images = torch.rand(1, 3, 32, 32)
    expected = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1((images - fe.mean) / fe.std)))))
    torch.testing.assert_close(fe(images)["layer1"], expected)


def test_frozen_unless_requires_grad() -> None:
    fe = TorchFXFeatureExtractor("resnet18", ["layer1"])
    fe.train()
    assert not fe.feature_extractor.training
    assert not fe(torch.rand(1, 3, 32, 32))["layer1"].requires_grad
    trainable = TorchFXFeatureExtractor("resnet18", ["layer1"], requires_grad=True)
    assert trainable(torch.rand(1, 3, 32, 32))["layer1"].requires_grad


def test_unknown_node_lists_the_model_nodes() -> None:
    with pytest.raises(ValueError, match=r"layer9.*layer1"):
        TorchFXFeatureExtractor("resnet18", ["layer9"])
    with pytest.raises(ValueError, match="unknown backbone"):
        TorchFXFeatureExtractor("no_such_net", ["x"])


def test_local_weights_load_and_mismatches_fail(tmp_path: Path) -> None:
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    fe = TorchFXFeatureExtractor("resnet18", ["layer1"], weights=str(path))
    torch.testing.assert_close(fe.feature_extractor.conv1.weight, source.conv1.weight)
    # Without the classifier head is fine; weights of another network are not.
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, headless)
    TorchFXFeatureExtractor("resnet18", ["layer1"], weights=headless)
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(ValueError, match="do not fit"):
        TorchFXFeatureExtractor("resnet18", ["layer1"], weights=str(other))
    with pytest.raises(FileNotFoundError):
        TorchFXFeatureExtractor("timm_resnet_not_here", ["layer1"], weights="/no/such/file.pth")


def test_unreachable_torchvision_weights_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="weights: <local path>"):
        TorchFXFeatureExtractor("resnet18", ["layer1"], weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="available"):
        TorchFXFeatureExtractor("resnet18", ["layer1"], weights="NOT_A_WEIGHT")
