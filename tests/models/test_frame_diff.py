"""The weight-free motion baseline learns where motion is normal, and boxes what is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.models.base import FitError, load_model
from oddeye.models.video.frame_diff import FrameDiff
from oddeye.sources.synthetic import SyntheticCamera

SIZE = (96, 128)


def clips_from(cam: SyntheticCamera, start: int, n: int) -> tuple[torch.Tensor, list[dict]]:
    frames = [cam.render(s) for s in range(start, start + n + 1)]
    imgs = torch.from_numpy(np.stack([f[0] for f in frames])).permute(0, 3, 1, 2).float() / 255
    clips = torch.stack([imgs[i : i + 2] for i in range(n)])
    return clips, [f[1] for f in frames[1:]]


@pytest.fixture(scope="module")
def fitted() -> tuple[FrameDiff, SyntheticCamera]:
    cam = SyntheticCamera(width=SIZE[1], height=SIZE[0], anomaly_every=40, anomaly_duration=10,
                          anomaly_kinds=["wrong_motion"], seed=3)  # fmt: skip
    normal = SyntheticCamera(width=SIZE[1], height=SIZE[0], anomaly_every=0, seed=3)
    train, _ = clips_from(normal, 0, 240)
    model = FrameDiff(image_size=SIZE)
    model.fit([train[i : i + 16] for i in range(0, 200, 16)], [train[200:240]], progress=False)
    return model, cam


def test_wrong_motion_scores_above_normal_and_is_boxed(fitted) -> None:
    model, cam = fitted
    clips, truth = clips_from(cam, 240, 80)
    pred = model(clips)
    anomalous = np.array([t["anomaly"] for t in truth])
    s = pred.score.numpy()
    assert s[anomalous].mean() > 0.8 and np.median(s[~anomalous]) < 0.5
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(anomalous, s) > 0.9
    # the top box of a flagged anomalous frame overlaps the running figure
    hits = 0
    for i in np.flatnonzero(anomalous & (s > 0.5)):
        boxes = pred.boxes[i]
        x1, y1, x2, y2 = truth[i]["box"]
        top = boxes[boxes[:, 4].argmax()]
        hits += int(top[0] < x2 and top[2] > x1 and top[1] < y2 and top[3] > y1)
    assert hits >= 0.8 * (anomalous & (s > 0.5)).sum()


def test_save_load_round_trip(fitted, tmp_path: Path) -> None:
    model, cam = fitted
    clips, _ = clips_from(cam, 0, 8)
    path = model.save(tmp_path / "fd.pt")
    again = load_model(path)
    assert isinstance(again, FrameDiff)
    torch.testing.assert_close(again(clips).score, model(clips).score)


def test_bad_clips_rejected(fitted) -> None:
    model, _ = fitted
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        model(torch.zeros(2, 3, *SIZE))
    with pytest.raises(FitError, match="clip_length=2"):
        model(torch.zeros(1, 3, 3, *SIZE))
    with pytest.raises(FitError, match="no images"):
        FrameDiff(image_size=SIZE).fit([], progress=False)
