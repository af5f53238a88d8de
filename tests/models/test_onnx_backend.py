"""The onnxruntime inference backend: exported from the checkpoint on load, same scores as torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.frames import Frame
from oddeye.models.registry import create_model
from oddeye.pipeline.scoring import ModelWorker

pytest.importorskip("onnxruntime")


def _padim(tmp_path: Path) -> Path:
    model = create_model(
        "padim", backbone="resnet18", layers=["layer1"], pre_trained=False, n_features=8, image_size=[32, 32]
    )
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.fit([x], [x], progress=False)
    return model.save(tmp_path / "p.pt")


def test_onnxruntime_worker_scores_like_torch_for_any_batch_size(tmp_path: Path) -> None:
    path = _padim(tmp_path)
    torch_worker = ModelWorker(str(path), "cpu", 1, map_threshold=0.0)
    ort_worker = ModelWorker(str(path), "cpu", 1, map_threshold=0.0, backend="onnxruntime", batch_size=4)
    assert ort_worker.info()["inference"]["backend"] == "onnxruntime"
    rng = np.random.default_rng(1)
    for n in (1, 4, 6):  # padded, exact and split batches
        images = (rng.random((n, 32, 32, 3)) * 255).astype(np.uint8)
        frames = [Frame("cam", i, float(i), None) for i in range(n)]  # type: ignore[arg-type]
        expected, got = torch_worker.score(frames, images), ort_worker.score(frames, images)
        assert got.error is None
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)
        assert sorted(got.anomaly_maps) == list(range(n))
        for i in range(n):
            np.testing.assert_allclose(
                np.asarray(got.anomaly_maps[i], np.float32), np.asarray(expected.anomaly_maps[i], np.float32), atol=2
            )


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    path = _padim(tmp_path)
    with pytest.raises(ValueError, match="backend"):
        ModelWorker(str(path), "cpu", 1, backend="openvino")


def test_onnxruntime_backbone_of_per_camera_heads_scores_like_torch(tmp_path: Path) -> None:
    from oddeye.models.camera_heads import CameraHeads
    from oddeye.pipeline.camera_scoring import CameraHeadsWorker
    from tests.pipeline.test_camera_scoring import PARAMS, SIZE, camera_frames, fit_head, mixed_batch, model_config

    torch.manual_seed(0)
    heads = CameraHeads.open(tmp_path / "models", "dfm", PARAMS, (SIZE, SIZE))
    for cam, seed in (("cam-a", 1), ("cam-b", 2)):
        fit_head(heads, cam, camera_frames(cam, seed, 24)[1])
    cfg = model_config(tmp_path, on_missing="skip")
    torch_worker = CameraHeadsWorker(cfg, device="cpu", num_threads=1)
    ort_worker = CameraHeadsWorker(cfg, device="cpu", num_threads=1, backend="onnxruntime", batch_size=4)
    assert ort_worker.info()["inference"]["backend"] == "onnxruntime"
    frames, images = mixed_batch()  # 10 frames (split into graphs of 4, the last padded); cam-c has no head
    expected, got = torch_worker.score(frames, images, "all"), ort_worker.score(frames, images, "all")
    assert got.skipped == expected.skipped and got.failed == {} and len(got.skipped) == 2
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        CameraHeadsWorker(cfg, device="cpu", num_threads=1, backend="openvino")
