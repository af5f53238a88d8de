"""AI-VAD's torchvision/timm backends wired with random weights on tiny inputs, and their weight errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oddeye.models.components.feature_extractor import WeightsUnavailableError
from oddeye.models.video.ai_vad import AiVad, weights
from oddeye.models.video.ai_vad.features import DeepExtractor, PoseExtractor, box_tensor
from oddeye.models.video.ai_vad.flow import FlowExtractor
from oddeye.models.video.ai_vad.regions import RegionExtractor

H, W = 64, 80


def moving_square(b: int = 2) -> torch.Tensor:
    """Clips [b, 2, 3, H, W]: a bright square moving 4 px right on a dark background."""
    clips = torch.full((b, 2, 3, H, W), 0.2)
    clips[:, 0, :, 20:36, 20:36] = 0.9
    clips[:, 1, :, 20:36, 24:40] = 0.9
    return clips


@pytest.mark.slow  # Mask R-CNN v2's box head runs on 1000 proposals: ~10 s on a busy 2-core CPU
def test_maskrcnn_regions_with_random_weights() -> None:
    ex = RegionExtractor("maskrcnn", pre_trained=False, detector_size=64, min_bbox_area=10)
    clips = moving_square()
    boxes = ex(clips[:, 0], clips[:, 1])
    assert len(boxes) == 2 and all(b.ndim == 2 and b.shape[1] == 5 for b in boxes)
    # the foreground detection of the moving square is there whatever the random detector says
    assert all(b.shape[0] >= 1 for b in boxes)


def test_raft_flow_with_random_weights() -> None:
    clips = moving_square()
    flow = FlowExtractor("raft_small", pre_trained=False)(clips[:, 0], clips[:, 1])
    assert flow.shape == (2, 2, H, W) and torch.isfinite(flow).all()


def test_keypoint_pose_with_random_weights() -> None:
    pose = PoseExtractor(pre_trained=False, detector_size=64)
    images = torch.rand(2, 3, H, W)
    boxes = [torch.tensor([[10.0, 10, 40, 50, 1], [5, 5, 20, 30, 1]]), torch.zeros(0, 5)]
    out = pose(images, boxes)
    assert out.shape == (2, 34) and torch.isfinite(out).all()
    assert pose(images, [torch.zeros(0, 5), torch.zeros(0, 5)]).shape == (0, 34)


def test_timm_deep_features_with_random_weights() -> None:
    deep = DeepExtractor("resnet10t", pre_trained=False)
    rois = box_tensor([torch.tensor([[10.0, 10, 40, 50]]), torch.tensor([[0.0, 0, 20, 20], [5, 5, 60, 60]])])
    out = deep(torch.rand(2, 3, H, W), rois)
    assert out.shape == (3, deep.model.num_features)
    assert deep(torch.rand(1, 3, H, W), torch.zeros(0, 5)).shape == (0, deep.model.num_features)


@pytest.mark.slow
def test_full_model_with_torchvision_backends_fits_and_scores() -> None:
    model = AiVad(image_size=(H, W), region_backend="maskrcnn", flow_backend="raft_small", pose_backend="keypointrcnn",
                  deep_backend="resnet10t", pre_trained=False, detector_size=64, min_bbox_area=10)  # fmt: skip
    clips = moving_square(3)
    model.fit([clips[:2], clips[2:]], progress=False)
    pred = model(clips)
    assert pred.score.shape == (3,) and len(pred.boxes) == 3
    assert all(b.shape[1] == 5 for b in pred.boxes)


def test_missing_pretrained_weights_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_url_cached_or_reachable", lambda url: (False, "offline"))
    with pytest.raises(WeightsUnavailableError, match=r"weights: \{flow: <local state_dict file>\}"):
        FlowExtractor("raft_small", pre_trained=True)
    with pytest.raises(WeightsUnavailableError, match=r"weights: \{regions:"):
        AiVad(image_size=(H, W), region_backend="maskrcnn", flow_backend="farneback", pose_backend="none",
              deep_backend="none")  # fmt: skip


def test_local_weights_load_and_a_missing_file_is_named(tmp_path: Path) -> None:
    source = FlowExtractor("raft_small", pre_trained=False)
    path = tmp_path / "raft_small.pth"
    torch.save(source.raft.state_dict(), path)
    loaded = FlowExtractor("raft_small", weights=str(path))
    for a, b in zip(source.raft.state_dict().values(), loaded.raft.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(WeightsUnavailableError, match=r"weights\.flow"):
        FlowExtractor("raft_small", weights=str(tmp_path / "nope.pth"))
