"""Scoring helpers: video windows never mix clips, a video model plugs into the video eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oddeye.data.synth_video import SynthVideoSpec, write_video_benchmark
from oddeye.data.video import open_video_dataset
from oddeye.evaluation.evaluate import evaluate_video, score_images, score_video_clip, video_windows
from oddeye.evaluation.metrics import MetricError
from oddeye.frames import Prediction


class MotionModel(nn.Module):
    """A stand-in video model: a window's score is the mean absolute change between its two frames."""

    is_video = True
    clip_length = 2

    def forward(self, clips: torch.Tensor) -> Prediction:
        assert clips.ndim == 5 and clips.shape[1] == 2
        x = clips.float() / 255
        return Prediction(score=(x[:, 1] - x[:, 0]).abs().mean(dim=(1, 2, 3)) * 10)


def test_video_windows_stay_inside_clips() -> None:
    clips = [np.full((3, 4, 4, 3), c, np.uint8) for c in (10, 20)]
    batches = list(video_windows(clips, 2, batch_size=3))
    windows = torch.cat(batches)
    assert windows.shape == (4, 2, 3, 4, 4)  # 2 windows per 3-frame clip
    assert all(len(torch.unique(w)) == 1 for w in windows)  # no window mixes the two clips


def test_score_video_clip_pads_the_first_frames() -> None:
    frames = np.zeros((5, 8, 8, 3), np.uint8)
    frames[3:] = 255
    s = score_video_clip(MotionModel(), frames, batch_size=2)
    assert s.shape == (5,) and s[3] > s[2] == s[0] == s[1]
    with pytest.raises(MetricError, match="shorter than the model's clip_length"):
        score_video_clip(MotionModel(), frames[:1])


def test_a_video_model_plugs_into_the_video_eval(tmp_path: Path) -> None:
    spec = SynthVideoSpec(width=64, height=48, scenes=1, train_clips=1, test_clips=3, frames=30, walkers=1)
    (root,) = write_video_benchmark(tmp_path, seed=0, spec=spec)
    result = evaluate_video(MotionModel(), open_video_dataset(root), (48, 64), batch_size=8)
    assert result.n_frames == 90 and 0.0 <= result.frame_auroc_micro <= 1.0
    assert result.clips_used + result.clips_skipped == 3


def test_nan_scores_are_an_error() -> None:
    class NaNModel(nn.Module):
        def forward(self, images: torch.Tensor) -> Prediction:
            return Prediction(score=torch.full((images.shape[0],), float("nan")))

    with pytest.raises(MetricError, match="NaN"):
        score_images(NaNModel(), np.zeros((3, 8, 8, 3), np.uint8))


def test_video_eval_applies_the_models_temporal_smoothing() -> None:
    class Smoothed(MotionModel):
        def smooth_frame_scores(self, scores: np.ndarray) -> np.ndarray:
            return np.convolve(scores, np.ones(3) / 3, mode="same")

    frames = np.zeros((7, 8, 8, 3), np.uint8)
    frames[3:] = 255
    raw = score_video_clip(MotionModel(), frames)
    smooth = score_video_clip(Smoothed(), frames)
    assert smooth.dtype == np.float64
    assert np.allclose(smooth, np.convolve(raw, np.ones(3) / 3, mode="same"))


def test_eval_ranks_by_unsaturated_logits() -> None:
    """Two anomalies and the worst normal image all saturate at 1.0; the logits still order them."""

    class Saturating(nn.Module):
        def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
            return images.double().mean(dim=(1, 2, 3)) * 100, None

        def forward(self, images: torch.Tensor) -> Prediction:
            return Prediction(score=torch.sigmoid(self.logits(images)[0].float()))

    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 1, 2, 3)])
    scores, _, _ = score_images(Saturating(), images)
    assert scores.dtype == np.float64 and len(set(scores.tolist())) == 4
    assert np.all(Saturating()(torch.from_numpy(images).permute(0, 3, 1, 2)).score[1:].numpy() == 1.0)
