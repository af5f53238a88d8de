"""AI-VAD live on real Ray: two interleaved cameras, per-camera clips, alerts with a box on the right object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.config import parse_config
from oddeye.models.video.ai_vad import AiVad
from oddeye.pipeline.ingest import prepare_frame
from oddeye.pipeline.runner import Pipeline
from oddeye.sources.synthetic import SyntheticCamera

pytestmark = pytest.mark.slow
H, W = 120, 160
KINDS = ["wrong_motion", "foreign_object"]


def _clips(cam: SyntheticCamera, starts: range) -> torch.Tensor:
    # Through the same JPEG round trip as the live frames, so compression noise counts as normal.
    seqs = sorted({s for st in starts for s in (st, st + 1)})
    frames = {s: prepare_frame(cam.frame_at(s), (H, W)).image for s in seqs}
    clips = np.stack([np.stack([frames[st], frames[st + 1]]) for st in starts])
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255


def _fit(tmp: Path) -> Path:
    cam = SyntheticCamera(width=W, height=H, anomaly_every=0, seed=3, encode=True, num_frames=None)
    train, val = _clips(cam, range(0, 800, 4)), _clips(cam, range(800, 1000, 2))
    model = AiVad(image_size=(H, W), region_backend="background", flow_backend="farneback", pose_backend="none",
                  deep_backend="color_histogram")  # fmt: skip
    model.fit([train[i : i + 25] for i in range(0, len(train), 25)], [val], progress=False)
    return model.save(tmp / "ai_vad.pt")


def test_two_interleaved_cameras_alert_with_a_box_on_the_anomalous_object(ray_local, tmp_path: Path) -> None:
    ckpt = _fit(tmp_path)
    cam = {"type": "synthetic", "width": W, "height": H, "seed": 3, "num_frames": 120, "encode": True}
    raw = {
        "sources": [
            {**cam, "camera_id": "cam-a", "anomaly_every": 60, "anomaly_duration": 15, "anomaly_kinds": KINDS},
            {**cam, "camera_id": "cam-b", "anomaly_every": 0},
        ],
        "model": {"name": "ai_vad", "checkpoint": str(ckpt), "device": "cpu", "image_size": [H, W], "replicas": 2},
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
    # Never a mixed clip: cam-b shows the normal scene only, so it stays below the alert level.
    assert max(r["score"] for r in scores if r["camera_id"] == "cam-b") < 0.5

    alerts = [json.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_text().splitlines()]
    opened = [a for a in alerts if a["state"] == "open"]
    assert opened and all(a["camera_id"] == "cam-a" for a in opened)
    truth = SyntheticCamera(width=W, height=H, seed=3, anomaly_every=60, anomaly_duration=15, anomaly_kinds=KINDS)
    for period_start, kind in ((45, "wrong_motion"), (105, "foreign_object")):
        hits = [a for a in opened if period_start <= a["start_seq"] < period_start + 15]
        assert hits, f"no alert for the {kind} period at {period_start}"
        a = hits[0]
        assert a["boxes"], "the alert carries the boxes of its regions"
        # The boxes are those of the run's peak frame: any frame from the run's start to the event.
        start = a["start_seq"]
        metas = [truth.render(q)[1] for q in range(start, a["seq"] + 1)]
        assert {m["kind"] for m in metas} == {kind}
        bx = max(a["boxes"], key=lambda b: b[4])
        # A clip's regions come from the motion between its frames, so the event's box one frame
        # either side counts too (the wrong-motion figure moves 7 px a frame at this size).
        near = [truth.render(q)[1] for q in range(start - 1, a["seq"] + 2)]
        boxes = [m["box"] for m in near if m.get("box") is not None]
        assert any(bx[0] < x2 and bx[2] > x1 and bx[1] < y2 and bx[3] > y1 for x1, y1, x2, y2 in boxes), (
            kind,
            bx,
            boxes,
        )
        assert Path(a["snapshot"]).is_file()
