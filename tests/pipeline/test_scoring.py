"""The model worker without Ray: a failing frame costs only itself, maps come back only where needed."""

from __future__ import annotations

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


def test_maps_only_for_frames_at_or_above_the_map_threshold(tmp_path: Path) -> None:
    model = create_model(
        "padim", backbone="resnet18", layers=["layer1"], pre_trained=False, n_features=8, image_size=[32, 32]
    )
    x = torch.rand(6, 3, 32, 32)
    model.fit([x], [x], progress=False)
    path = model.save(tmp_path / "p.pt")
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


def _padim_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(
        "padim", backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, n_features=16, image_size=[64, 64]
    )
    x = torch.rand(8, 3, 64, 64)
    model.fit([x], [x], progress=False)
    return model.save(tmp_path / "p.pt")


def _concurrent_equals_serial(worker: ModelWorker) -> None:
    """Calls in two threads (how a CUDA actor with max_concurrency=2 runs) give each batch its own scores."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8) for n in (4, 3, 5, 4, 2, 4)]
    frames = [[Frame("cam", i, float(i), None) for i in range(len(b))] for b in batches]  # type: ignore[arg-type]
    serial = [worker.score(f, b, "all") for f, b in zip(frames, batches, strict=True)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda fb: worker.score(fb[0], fb[1], "all"), zip(frames, batches, strict=True)))
    for a, b in zip(serial, together, strict=True):
        assert a.error is None and b.error is None
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        assert sorted(b.anomaly_maps) == sorted(a.anomaly_maps) == list(range(len(a.scores)))
        for k in a.anomaly_maps:
            assert np.abs(b.anomaly_maps[k].astype(int) - a.anomaly_maps[k].astype(int)).max() <= 1


def test_concurrent_calls_score_each_batch_as_alone(tmp_path: Path) -> None:
    worker = ModelWorker(str(_padim_checkpoint(tmp_path)), "cpu", 1)
    assert worker._copy_stream is None  # the CPU path: calls take turns
    _concurrent_equals_serial(worker)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_overlap_compute_and_scores_match_serial(tmp_path: Path) -> None:
    worker = ModelWorker(str(_padim_checkpoint(tmp_path)), "cuda", 1)
    assert worker._copy_stream is not None  # batches are staged on a side stream
    _concurrent_equals_serial(worker)


def test_only_cuda_image_model_actors_take_two_calls_at_once() -> None:
    from oddeye.config import ModelConfig
    from oddeye.pipeline.actors import model_actor_options
    from oddeye.pipeline.runner import _is_video

    cfg = ModelConfig(name="padim")
    assert model_actor_options(cfg, cuda=True, overlap=True)["max_concurrency"] == 2
    assert model_actor_options(cfg, cuda=False, overlap=True)["max_concurrency"] == 1
    assert model_actor_options(cfg, cuda=True, overlap=False)["max_concurrency"] == 1
    assert _is_video("ai_vad") and not _is_video("padim")
