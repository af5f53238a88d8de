"""R-KDE with a random-weight detector: regions, box features, KDE, boxes in predictions, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oddeye.models.base import FitError, list_models, model_params
from oddeye.models.image.rkde import Rkde

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

SIZE = 64


def tiny(**kw: object) -> Rkde:
    torch.manual_seed(0)
    params = {"pre_trained": False, "detector_size": SIZE, "min_box_size": 4, "n_pca_components": 4, **kw}
    model = Rkde(image_size=(SIZE, SIZE), **params)
    model.regions.detector.rpn._post_nms_top_n["testing"] = 60  # fewer proposals: a quicker test
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(images: torch.Tensor) -> Rkde:
    model = tiny(max_detections_per_image=20)
    model.fit([images[:3], images[3:6]], progress=False)
    return model


def test_registered_with_anomalib_defaults() -> None:
    assert "rkde" in list_models()
    d = model_params("rkde")
    assert (d["roi_stage"], d["roi_score_threshold"], d["min_box_size"], d["iou_threshold"]) == ("rcnn", 0.001, 25, 0.3)
    assert (d["max_detections_per_image"], d["n_pca_components"], d["max_training_points"]) == (100, 16, 40000)
    assert d["feature_scaling_method"] == "scale"


def test_regions_follow_the_detection_parameters(fitted: Rkde, images: torch.Tensor) -> None:
    boxes, features = fitted.regions_and_features(images[:2])
    for b, f in zip(boxes, features, strict=True):
        assert 0 < len(b) <= 20 and f.shape == (len(b), 1024)
        assert (b[:, 4] >= 0.001).all()
        assert ((b[:, 2] - b[:, 0]) >= 4).all() and ((b[:, 3] - b[:, 1]) >= 4).all()
        assert (b[:, :4] >= 0).all() and (b[:, :4] <= SIZE).all()  # input pixels, not the detector's


def test_scores_and_boxes_end_to_end(fitted: Rkde, images: torch.Tensor, tmp_path: Path) -> None:
    raw, amap, boxes = fitted.raw_forward(images[8:])
    assert amap is None and len(boxes) == 2
    for score, b in zip(raw, boxes, strict=True):
        assert b.shape[1] == 5 and score == b[:, 4].max()  # the image is its most anomalous region
    pred = fitted(images[8:])
    assert pred.score.shape == (2,) and all(b.shape[1] == 5 for b in pred.boxes)
    assert ((pred.boxes[0][:, 4] >= 0) & (pred.boxes[0][:, 4] <= 1)).all()
    loaded = Rkde.load(fitted.save(tmp_path / "rkde.pt"))
    assert isinstance(loaded, Rkde) and loaded.fitted
    loaded.regions.detector.rpn._post_nms_top_n["testing"] = 60  # the test's setting, as in tiny()
    again = loaded(images[8:])
    torch.testing.assert_close(again.score, pred.score, rtol=1e-4, atol=1e-5)  # threaded kernels: not bitwise
    for a, b in zip(again.boxes, pred.boxes, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rpn_stage() -> None:
    model = tiny(roi_stage="rpn", max_detections_per_image=15)
    boxes, features = model.regions_and_features(torch.rand(1, 3, SIZE, SIZE))
    assert 0 < len(boxes[0]) <= 15 and (boxes[0][:, 4] == 1).all() and features[0].shape[1] == 1024


def test_no_region_in_any_fit_image_names_the_threshold(images: torch.Tensor) -> None:
    model = tiny(roi_score_threshold=0.5, min_box_size=1000)  # no box is 1000 px wide in a 64 px image
    with pytest.raises(FitError, match=r"no region in any of the 4 fit images with roi_score_threshold=0\.5 and "):
        model.fit([images[:4]], progress=False)
    assert not model.fitted


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"roi_stage must be one of \['rcnn', 'rpn'\]"):
        Rkde(roi_stage="fast", pre_trained=False)
    with pytest.raises(ValueError, match=r"feature_scaling_method must be one of \['norm', 'scale'\]"):
        Rkde(feature_scaling_method="max", pre_trained=False)
