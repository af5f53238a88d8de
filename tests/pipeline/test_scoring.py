"""The model worker without Ray: a failing frame costs only itself, maps come back only where needed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.frames import Frame
from oddeye.models.image.null import add_fail_marker
from oddeye.models.registry import create_model
from oddeye.pipeline.scoring import ModelWorker


def _worker(tmp_path: Path, **kw: object) -> ModelWorker:
    model = create_model("null", image_size=[32, 32], fail_marker=True)
    model.fit([torch.rand(4, 3, 32, 32)], progress=False)
    path = model.save(tmp_path / "null.pt")
    return ModelWorker(str(path), "cpu", num_threads=1, **kw)


def test_a_marked_frame_fails_alone_and_the_rest_of_its_batch_is_scored(tmp_path: Path) -> None:
    w = _worker(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    images[3] = add_fail_marker(images[3])
    frames = [Frame("cam", i, float(i), None) for i in range(5)]  # type: ignore[arg-type]
    res = w.score(frames, images)
    assert res.error is None and list(res.failed) == [3] and "marked" in res.failed[3]
    assert np.isfinite(res.scores[[0, 1, 2, 4]]).all() and np.isnan(res.scores[3])
    assert w.info()["num_threads"] == 1 and torch.get_num_threads() == 1


def test_a_stream_of_failing_frames_logs_one_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = _worker(tmp_path)
    images = add_fail_marker(np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)[0])[None]
    with caplog.at_level(logging.ERROR, logger="oddeye.pipeline.scoring"):
        for i in range(5):
            assert w.score([Frame("cam", i, float(i), None)], images).error is not None  # type: ignore[arg-type]
    failures = [r for r in caplog.records if "failed on a batch of 1" in r.getMessage()]
    assert len(failures) == 5 and sum(r.exc_info is not None for r in failures) == 1
    assert "#5; traceback logged earlier" in failures[-1].getMessage()


def _tiny_padim(tmp_path: Path) -> Path:
    model = create_model(
        "padim", backbone="resnet18", layers=["layer1"], pre_trained=False, n_features=8, image_size=[32, 32]
    )
    x = torch.rand(6, 3, 32, 32)
    model.fit([x], [x], progress=False)
    return model.save(tmp_path / "p.pt")


def test_maps_only_for_frames_at_or_above_the_map_threshold(tmp_path: Path) -> None:
    path = _tiny_padim(tmp_path)
    images = (np.random.default_rng(1).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    frames = [Frame("cam", i, float(i), None) for i in range(4)]  # type: ignore[arg-type]
    everything = ModelWorker(str(path), "cpu", 1, map_threshold=0.0).score(frames, images)
    assert sorted(everything.anomaly_maps) == [0, 1, 2, 3]
    cut = float(np.median(everything.scores))
    some = ModelWorker(str(path), "cpu", 1, map_threshold=cut).score(frames, images)
    assert sorted(some.anomaly_maps) == [i for i in range(4) if everything.scores[i] >= cut]
    none = ModelWorker(str(path), "cpu", 1, map_threshold=2.0).score(frames, images)
    assert none.anomaly_maps == {}
    assert sorted(ModelWorker(str(path), "cpu", 1, map_threshold=2.0).score(frames, images, "all").anomaly_maps) == [
        0,
        1,
        2,
        3,
    ]


def test_model_precision_reaches_the_worker(tmp_path: Path) -> None:
    """``model.precision`` is what the worker's backbone runs in (bf16 on a CPU only when asked)."""
    path = _tiny_padim(tmp_path)
    assert ModelWorker(str(path), "cpu", 1, precision="bfloat16").inference["precision"] == "bfloat16"
    assert ModelWorker(str(path), "cpu", 1, precision="float32").inference["precision"] == "float32"
