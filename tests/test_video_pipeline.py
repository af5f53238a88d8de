"""A video model live on real Ray: per-camera clips, never mixed, alerts with boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.config import parse_config
from oddeye.models.video.frame_diff import FrameDiff
from oddeye.pipeline.ingest import prepare_frame
from oddeye.pipeline.runner import Pipeline
from oddeye.sources.synthetic import SyntheticCamera

pytestmark = pytest.mark.slow
H, W = 96, 128


def _fit(tmp: Path) -> Path:
    # Through the same JPEG round trip as the live frames, so compression noise counts as normal.
    cam = SyntheticCamera(width=W, height=H, anomaly_every=0, seed=3, num_frames=201, encode=True)
    frames = [prepare_frame(f, (H, W)).image for f in cam]
    imgs = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    clips = torch.stack([imgs[i : i + 2] for i in range(200)])
    model = FrameDiff(image_size=(H, W), sigma=6).fit(
        [clips[i : i + 20] for i in range(0, 160, 20)], [clips[160:]], progress=False
    )
    return model.save(tmp / "frame_diff.pt")


def test_two_interleaved_cameras_clips_alerts_with_boxes(ray_local, tmp_path: Path) -> None:
    ckpt = _fit(tmp_path)
    cam = {"type": "synthetic", "width": W, "height": H, "seed": 3, "num_frames": 120, "encode": True}
    raw = {
        "sources": [
            {
                **cam,
                "camera_id": "cam-a",
                "anomaly_every": 60,
                "anomaly_duration": 15,
                "anomaly_kinds": ["wrong_motion"],
            },
            {**cam, "camera_id": "cam-b", "anomaly_every": 0},
        ],
        "model": {"name": "frame_diff", "checkpoint": str(ckpt), "device": "cpu", "image_size": [H, W], "replicas": 2},
        "batching": {"max_batch_size": 8, "max_wait_ms": 10},
        "alerts": {"min_frames": 2, "close_frames": 3, "cooldown_s": 0, "update_interval_s": 0},
        "sinks": [{"type": "jsonl"}, {"type": "snapshots"}],
        "metrics": {"enabled": False},
    }
    s = Pipeline(parse_config(raw), out_dir=tmp_path / "out").run()
    assert s.ingested == 240
    assert s.dropped == {"clip_warmup": 2}  # the first frame of each camera starts its clip
    assert s.scored == 238 and s.dead_letters == 0
    assert s.clip_resets == {}

    scores = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    for c in ("cam-a", "cam-b"):
        seqs = [r["seq"] for r in scores if r["camera_id"] == c]
        assert seqs == list(range(1, 120))

    alerts = [json.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_text().splitlines()]
    opened = [a for a in alerts if a["state"] == "open"]
    assert opened and all(a["camera_id"] == "cam-a" for a in opened)
    truth = SyntheticCamera(
        width=W, height=H, seed=3, anomaly_every=60, anomaly_duration=15, anomaly_kinds=["wrong_motion"]
    )
    for period_start in (45, 105):
        hits = [a for a in opened if period_start <= a["start_seq"] < period_start + 15]
        assert hits, f"no alert for the wrong-motion period at {period_start}"
        a = hits[0]
        assert a["boxes"], "the alert carries the boxes of its worst regions"
        x1, y1, x2, y2 = truth.render(a["seq"])[1]["box"]
        bx = max(a["boxes"], key=lambda b: b[4])
        assert bx[0] < x2 and bx[2] > x1 and bx[1] < y2 and bx[3] > y1, (bx, (x1, y1, x2, y2))
        assert Path(a["snapshot"]).is_file()


def test_fit_from_config_builds_clips_of_consecutive_frames(tmp_path: Path) -> None:
    from oddeye.models.base import load_model
    from oddeye.pipeline.fit import collect_fit_images, fit_from_config

    raw = {
        "sources": [{"type": "synthetic", "width": W, "height": H, "seed": 3, "num_frames": 50}],
        "fit": {"max_frames": 30, "stride": 7},
        "model": {"name": "frame_diff", "checkpoint": str(tmp_path / "fd.pt"), "device": "cpu", "image_size": [H, W]},
    }
    cfg = parse_config(raw)
    clips = collect_fit_images(cfg, progress=False, clip_length=2)
    assert clips.shape == (30, 2, H, W, 3)
    cam = SyntheticCamera(width=W, height=H, seed=3, anomaly_every=0)
    # runs of two consecutive frames every 7: (0, 1), (7, 8), ...
    assert np.array_equal(clips[1, 0], cam.render(7)[0]) and np.array_equal(clips[1, 1], cam.render(8)[0])
    model, path = fit_from_config(cfg, progress=False)
    assert load_model(path).is_video and model.clip_length == 2
