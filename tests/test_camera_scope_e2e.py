"""model.scope camera end to end on real Ray: a new camera learnt from its stream, a refit hot-swapped."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from oddeye.config import parse_config
from oddeye.pipeline.fit import fit_camera_heads
from oddeye.pipeline.runner import Pipeline
from tests.conftest import tiny_config
from tests.test_pipeline_e2e import _metric, _scrape

pytestmark = pytest.mark.slow

MODEL = {
    "name": "dfm",
    "scope": "camera",
    "image_size": [64, 64],
    "device": "cpu",
    "params": {"backbone": "resnet18", "layer": "layer2", "pre_trained": False, "pooling_kernel_size": 2},
    "on_missing": "fit",
    "refresh_s": 0.5,
}


def test_a_new_camera_is_learnt_from_its_stream_and_a_refit_swaps_in(ray_local, tmp_path: Path) -> None:
    cam = {**tiny_config(tmp_path)["sources"][0], "width": 96, "height": 72, "realtime": True, "fps": 20}
    raw = tiny_config(
        tmp_path,
        sources=[
            {**cam, "camera_id": "known", "seed": 1, "num_frames": 200, "anomaly_every": 0},
            {**cam, "camera_id": "new", "seed": 2, "num_frames": 200, "anomaly_every": 0},
        ],
        fit={"max_frames": 20, "batch_size": 8, "val_fraction": 0.34},
        model={**MODEL, "directory": str(tmp_path / "models")},
    )
    cfg = parse_config(raw)
    fit_camera_heads(cfg, ["known"], progress=False)  # `oddeye fit --camera known` before the run
    pipeline = Pipeline(cfg, out_dir=tmp_path / "out")

    def refit_while_scoring() -> None:  # `oddeye fit --camera known` once the pipeline scores with v1
        deadline = time.monotonic() + 120
        while (pipeline.results is None or pipeline.results.scored < 20) and time.monotonic() < deadline:
            time.sleep(0.1)
        fit_camera_heads(cfg, ["known"], progress=False)

    refit = threading.Thread(target=refit_while_scoring, daemon=True)
    refit.start()
    try:
        s = pipeline.run()
        samples = _scrape(s.metrics_port)
    finally:
        refit.join()
        pipeline.close()

    assert s.stop_reason == "sources_exhausted" and s.error is None
    # Every frame is scored or counted: the new camera's fit frames as dropped, reason `fitting`.
    assert s.ingested == 400 and s.dead_letters == 0
    assert s.scored + s.dropped.get("fitting", 0) == 400 and set(s.dropped) <= {"fitting"}
    assert _metric(samples, "oddeye_frames_dropped_total", camera="known", reason="fitting") == 0
    assert 20 <= _metric(samples, "oddeye_frames_dropped_total", camera="new", reason="fitting") < 200
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert sum(r["camera_id"] == "known" for r in scores) == 200  # never paused by the other camera's fit
    assert any(r["camera_id"] == "new" for r in scores)  # scores once its head is ready
    # The new camera's head was fitted from the stream and stored; the refit of `known` was swapped in.
    assert (tmp_path / "models" / "cameras" / "new" / "v1.pt").is_file()
    assert _metric(samples, "oddeye_fit_progress", camera="new") == 1.0
    assert _metric(samples, "oddeye_model_version", camera="new") == 1.0
    assert _metric(samples, "oddeye_model_version", camera="known") == 2.0
    assert _metric(samples, "oddeye_model_swaps_total", camera="known") == 1.0
    assert _metric(samples, "oddeye_model_fit_timestamp_seconds", camera="new") > time.time() - 600
    assert _metric(samples, "oddeye_model_head_bytes", model="dfm") > 0
