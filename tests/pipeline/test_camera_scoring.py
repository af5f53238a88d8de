"""model.scope camera without Ray: each frame scored by its camera's head, on_missing, hot swap, config, refit."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from oddeye.config import ConfigError, ModelConfig, parse_config
from oddeye.frames import Frame
from oddeye.models.base import FitError
from oddeye.models.camera_heads import CameraHeads
from oddeye.models.image.dfm import Dfm
from oddeye.models.registry import create_model
from oddeye.pipeline.camera_scoring import CameraHeadsWorker, camera_actor_kwargs
from oddeye.pipeline.fit import fit_camera_heads
from oddeye.pipeline.scoring import BatchResult
from oddeye.sources.synthetic import SyntheticCamera
from tests.pipeline.test_results import Recorder, frames, handler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
PARAMS = {"backbone": "resnet18", "layer": "layer2", "pre_trained": False, "pooling_kernel_size": 2}


def camera_frames(camera: str, seed: int, n: int, start: int = 0) -> tuple[list[Frame], np.ndarray]:
    """Normal frames of a synthetic camera (its own scene: the seed), at the model's input size."""
    cam = SyntheticCamera(camera, SIZE, SIZE, num_frames=n, seed=seed, anomaly_every=0, start_seq=start)
    frames = list(cam)
    images = np.stack([f.image for f in frames])
    return [Frame(f.camera_id, f.seq, f.timestamp, None) for f in frames], images  # type: ignore[arg-type]


def model_config(tmp_path: Path, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="dfm", scope="camera", directory=str(tmp_path / "models"), image_size=(SIZE, SIZE), params=PARAMS, **kw
    )


def fit_head(heads: CameraHeads, key: str, images: np.ndarray) -> None:
    batches = [torch.from_numpy(images[i : i + 8]).permute(0, 3, 1, 2).float() / 255 for i in range(0, len(images), 8)]
    heads.save_head(key, heads.fit_head(batches, folds=3))


@pytest.fixture
def directory(tmp_path: Path) -> CameraHeads:
    """A model directory with heads for cam-a (seed 1) and cam-b (seed 2)."""
    torch.manual_seed(0)
    heads = CameraHeads.open(tmp_path / "models", "dfm", PARAMS, (SIZE, SIZE))
    for cam, seed in (("cam-a", 1), ("cam-b", 2)):
        fit_head(heads, cam, camera_frames(cam, seed, 24)[1])
    return heads


def mixed_batch() -> tuple[list[Frame], np.ndarray]:
    fa, ia = camera_frames("cam-a", 1, 4, start=100)
    fb, ib = camera_frames("cam-b", 2, 4, start=100)
    fc, ic = camera_frames("cam-c", 3, 2, start=100)
    order = [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]  # interleaved cameras
    frames, images = fa + fb + fc, np.concatenate([ia, ib, ic])
    return [frames[i] for i in order], images[order]


def test_a_mixed_batch_scores_each_frame_with_its_own_camera_head(directory: CameraHeads, tmp_path: Path) -> None:
    worker = CameraHeadsWorker(model_config(tmp_path, on_missing="skip"), device="cpu", num_threads=1)
    assert worker.info()["routes_by_camera"] is True
    frames, images = mixed_batch()
    res = worker.score(frames, images, "all")
    cams = [f.camera_id for f in frames]
    known = [i for i, c in enumerate(cams) if c != "cam-c"]
    # What each camera's own head gives for its frames alone:
    for cam in ("cam-a", "cam-b"):
        rows = [i for i, c in enumerate(cams) if c == cam]
        alone, _ = directory.predict(
            torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 255, [cam] * len(rows)
        )
        np.testing.assert_allclose(res.scores[rows], alone.score.numpy(), rtol=1e-4, atol=1e-5)
    assert res.skipped == {i: "no_model" for i, c in enumerate(cams) if c == "cam-c"}
    assert sorted(res.anomaly_maps) == known and res.model_versions == dict.fromkeys(known, 1)
    assert res.camera_models["cam-a"]["version"] == 1 and res.camera_models["cam-c"]["version"] == 0
    assert res.head_bytes and res.head_bytes > 0
    # A cam-a frame under cam-b's head is far from normal: the heads differ, and each frame got its own.
    a_rows = [i for i, c in enumerate(cams) if c == "cam-a"]
    crossed, _ = directory.predict(
        torch.from_numpy(images[a_rows]).permute(0, 3, 1, 2).float() / 255, ["cam-b"] * len(a_rows)
    )
    assert crossed.score.min() > res.scores[a_rows].max()


def fallback_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    fallback = create_model("dfm", image_size=[SIZE, SIZE], **PARAMS)
    fallback.fit([torch.from_numpy(camera_frames("x", 9, 16)[1]).permute(0, 3, 1, 2).float() / 255], progress=False)
    return fallback.save(tmp_path / "default.pt")


@pytest.mark.parametrize("on_missing", ["skip", "default", "fit"])
def test_batched_heads_score_three_cameras_and_leave_an_unfitted_one_to_on_missing(
    directory: CameraHeads, tmp_path: Path, on_missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three fitted cameras and an unfitted one in one batch: the heads scored in one batched pass give what
    the per-camera path gives, and the unfitted camera's frames go to on_missing exactly as before."""
    fit_head(directory, "cam-d", camera_frames("cam-d", 4, 24)[1])
    parts = [camera_frames(cam, seed, n, start=100) for cam, seed, n in (("cam-a", 1, 3), ("cam-b", 2, 2))]
    parts += [camera_frames(cam, seed, n, start=100) for cam, seed, n in (("cam-c", 3, 2), ("cam-d", 4, 3))]
    order = [0, 3, 5, 7, 1, 8, 4, 6, 2, 9]  # a, b, c, d interleaved
    frames = [f for fs, _ in parts for f in fs]
    frames, images = [frames[i] for i in order], np.concatenate([im for _, im in parts])[order]
    default = fallback_checkpoint(tmp_path) if on_missing == "default" else None
    cfg = model_config(tmp_path, on_missing=on_missing, default=str(default) if default else None)

    def run() -> tuple[CameraHeadsWorker, BatchResult]:
        checkpoint = default.read_bytes() if default else None
        worker = CameraHeadsWorker(cfg, checkpoint, device="cpu", num_threads=1, fit_max_frames=12)
        return worker, worker.score(frames, images, "all")

    batched = Dfm.score_embedding_heads
    calls: list[int] = []
    with monkeypatch.context() as m:  # the batched path, seen to run once for the three heads
        m.setattr(
            Dfm,
            "score_embedding_heads",
            classmethod(lambda cls, heads, *a: calls.append(len(heads)) or batched(heads, *a)),
        )
        worker, res = run()
    assert calls == [3]
    with monkeypatch.context() as m:  # the per-camera path: each head scores its own rows
        m.setattr(Dfm, "score_embedding_heads", classmethod(lambda cls, *args: None))
        looped_worker, looped = run()
    cams = [f.camera_id for f in frames]
    fitted = [i for i, c in enumerate(cams) if c != "cam-c"]
    unfitted = [i for i, c in enumerate(cams) if c == "cam-c"]
    np.testing.assert_allclose(res.scores[fitted], looped.scores[fitted], rtol=0, atol=1e-4)
    for i in fitted:
        np.testing.assert_allclose(res.anomaly_maps[i], looped.anomaly_maps[i], rtol=0, atol=1)  # uint8 maps
    for cam in ("cam-a", "cam-b", "cam-d"):  # each frame got its own camera's head
        rows = [i for i, c in enumerate(cams) if c == cam]
        alone = worker.heads.get(cam).model(torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 255)
        np.testing.assert_allclose(res.scores[rows], alone.score.numpy(), rtol=0, atol=1e-4)
    # The unfitted camera: handled as the per-camera path handles it, as on_missing promises.
    assert res.skipped == looped.skipped and res.model_versions == looped.model_versions
    assert res.camera_models == looped.camera_models
    assert all(res.model_versions[i] == 1 for i in fitted)
    if on_missing == "skip":
        assert res.skipped == dict.fromkeys(unfitted, "no_model") and np.isnan(res.scores[unfitted]).all()
    elif on_missing == "default":
        assert res.skipped == {} and all(res.model_versions[i] == 0 for i in unfitted)
        expected = worker.default(torch.from_numpy(images[unfitted]).permute(0, 3, 1, 2).float() / 255).score
        np.testing.assert_allclose(res.scores[unfitted], expected.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(res.scores[unfitted], looped.scores[unfitted], rtol=0, atol=1e-4)
    else:
        assert res.skipped == dict.fromkeys(unfitted, "fitting") and np.isnan(res.scores[unfitted]).all()
        assert len(worker._buffers["cam-c"]) == len(looped_worker._buffers["cam-c"]) == len(unfitted)
        assert res.camera_models["cam-c"]["fit_progress"] == pytest.approx(len(unfitted) / 12)
    worker.close()
    looped_worker.close()


def test_the_shared_backbone_is_prepared_for_inference_with_the_configured_precision(
    directory: CameraHeads, tmp_path: Path
) -> None:
    """As the pipeline scope's ModelWorker: channels_last, folded batch norms and model.precision for the
    backbone every head shares; the heads keep scoring in float32."""
    frames, images = camera_frames("cam-a", 1, 4, start=100)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected, _ = directory.predict(x, ["cam-a"] * 4)  # the directory as opened: no speed-ups
    worker = CameraHeadsWorker(model_config(tmp_path), device="cpu", num_threads=1, precision="float32")
    settings = worker.info()["inference"]
    assert settings["channels_last"] is True and settings["precision"] == "float32"
    assert settings["folded_batch_norms"] == 1 and settings["backbones"] == ["TimmFeatureExtractor"]
    res = worker.score(frames, images)
    np.testing.assert_allclose(res.scores, expected.score.numpy(), rtol=0, atol=1e-4)
    bf16 = CameraHeadsWorker(model_config(tmp_path), device="cpu", num_threads=1, precision="bfloat16")
    assert bf16.info()["inference"]["precision"] == "bfloat16"
    got = bf16.score(frames, images)
    assert np.isfinite(got.scores).all() and got.skipped == {}
    assert bf16.heads.get("cam-a").model.pca_model.singular_vectors.dtype == torch.float32
    raw = {"sources": [{"type": "synthetic"}], "model": {"scope": "camera", "precision": "bfloat16", "compile": True}}
    kwargs = camera_actor_kwargs(parse_config(raw))
    assert kwargs["precision"] == "bfloat16" and kwargs["compile"] is True


def test_on_missing_default_scores_with_the_fallback_model(directory: CameraHeads, tmp_path: Path) -> None:
    torch.manual_seed(0)
    fallback = create_model("dfm", image_size=[SIZE, SIZE], **PARAMS)
    fallback.fit([torch.from_numpy(camera_frames("x", 9, 16)[1]).permute(0, 3, 1, 2).float() / 255], progress=False)
    path = fallback.save(tmp_path / "default.pt")
    cfg = model_config(tmp_path, on_missing="default", default=str(path))
    worker = CameraHeadsWorker(cfg, default_checkpoint=path.read_bytes(), device="cpu", num_threads=1)
    frames, images = mixed_batch()
    res = worker.score(frames, images)
    assert res.skipped == {} and np.isfinite(res.scores).all()
    assert all(res.model_versions[i] == 0 for i, f in enumerate(frames) if f.camera_id == "cam-c")
    assert all(res.model_versions[i] == 1 for i, f in enumerate(frames) if f.camera_id != "cam-c")


def test_on_missing_fit_learns_a_new_camera_from_its_first_frames(directory: CameraHeads, tmp_path: Path) -> None:
    worker = CameraHeadsWorker(
        model_config(tmp_path, on_missing="fit"), device="cpu", num_threads=1, fit_max_frames=12, fit_folds=3
    )
    frames, images = camera_frames("cam-new", 5, 24)
    first = worker.score(frames[:8], images[:8])
    assert first.skipped == dict.fromkeys(range(8), "fitting")
    assert first.camera_models["cam-new"]["fit_progress"] == pytest.approx(8 / 12)
    second = worker.score(frames[8:16], images[8:16])  # frames 8-11 complete the fit set; the fit starts
    assert second.skipped == dict.fromkeys(range(8), "fitting")
    deadline = time.monotonic() + 60
    while worker._fits and time.monotonic() < deadline:
        worker._fits["cam-new"].exception(timeout=deadline - time.monotonic())
        worker._refresh()
    third = worker.score(frames[16:], images[16:])
    assert third.skipped == {} and np.isfinite(third.scores).all()
    assert third.camera_models["cam-new"] == {
        "version": 1.0,
        "fitted_at": pytest.approx(time.time(), abs=120),
        "fit_progress": 1.0,
    }
    assert (tmp_path / "models" / "cameras" / "cam-new" / "v1.pt").is_file()
    # Learnt from its own stream: its frames score lower under its new head than under another camera's.
    other, _ = directory.predict(torch.from_numpy(images[16:]).permute(0, 3, 1, 2).float() / 255, ["cam-a"] * 8)
    assert third.scores.mean() < other.score.numpy().mean()
    worker.close()


def test_a_refit_hot_swaps_without_losing_frames(directory: CameraHeads, tmp_path: Path) -> None:
    worker = CameraHeadsWorker(model_config(tmp_path, refresh_s=0.05), device="cpu", num_threads=1)
    frames, images = camera_frames("cam-a", 1, 16, start=200)
    before = worker.score(frames[:8], images[:8])
    fit_head(directory, "cam-a", camera_frames("cam-a", 7, 24)[1])  # `oddeye fit --camera cam-a`, elsewhere
    time.sleep(0.1)
    after = worker.score(frames[8:], images[8:])
    for res in (before, after):
        assert res.skipped == {} and res.failed == {} and np.isfinite(res.scores).all()  # every frame scored
    assert set(before.model_versions.values()) == {1} and set(after.model_versions.values()) == {2}
    assert after.swaps == {"cam-a": 1} and after.camera_models["cam-a"]["version"] == 2


def test_on_missing_fit_starts_after_fit_max_seconds_of_the_stream(tmp_path: Path) -> None:
    worker = CameraHeadsWorker(
        model_config(tmp_path, on_missing="fit"),
        device="cpu",
        num_threads=1,
        fit_max_frames=1000,
        fit_max_seconds=2.0,
        fit_folds=3,
    )
    frames, images = camera_frames("cam-new", 5, 16)
    frames = [Frame(f.camera_id, f.seq, 1000.0 + 0.25 * i, None) for i, f in enumerate(frames)]  # 4 frames/s
    first = worker.score(frames[:4], images[:4])  # 0.75 s of stream: 4 of 1000 frames, 3/8 of the time
    assert first.camera_models["cam-new"]["fit_progress"] == pytest.approx(0.75 / 2.0)
    assert not worker._fits
    worker.score(frames[4:12], images[4:12])  # frame 8 is at 2.0 s: the fit starts on the 9 frames kept
    assert "cam-new" in worker._fits and len(worker._buffers["cam-new"]) == 9
    worker._fits["cam-new"].exception(timeout=60)
    worker._refresh()
    done = worker.score(frames[12:], images[12:])
    assert done.skipped == {} and np.isfinite(done.scores).all()
    assert done.camera_models["cam-new"]["version"] == 1.0
    worker.close()


def _refit_worker(tmp_path: Path, **refit: Any) -> CameraHeadsWorker:
    cfg = parse_config(
        {
            "sources": [{"type": "synthetic", "camera_id": "cam-a"}],
            "model": {**model_config(tmp_path).model_dump(), "params": PARAMS},
            "refit": {"every": 0.2, "min_frames": 8, "max_frames": 20, "val_fraction": 0.25, **refit},
            "fit": {"batch_size": 8, "val_fraction": 0.34},
        }
    )
    kw = camera_actor_kwargs(cfg)
    # The synthetic scene drifts: frames long after the fit score high under the fixture's heads (fitted
    # on 24 frames). An alert threshold of 0.9 keeps the next few dozen frames normal.
    return CameraHeadsWorker(**kw, device="cpu", num_threads=1, map_threshold=0.9)


def test_a_scheduled_refit_learns_from_frames_scored_normal_and_swaps_in(
    directory: CameraHeads, tmp_path: Path
) -> None:
    worker = _refit_worker(tmp_path)
    assert worker.refit is not None and worker.refit.every == 0.2
    frames, images = camera_frames("cam-a", 1, 48, start=24)
    first = worker.score(frames[:24], images[:24])
    normal = int((first.scores < 0.9).sum())
    assert normal >= 8, first.scores  # the head's own scene scores normal
    assert len(worker._normal["cam-a"].frames) == min(normal, 20)
    time.sleep(0.25)
    worker.score(frames[24:32], images[24:32])  # the refit is due: it starts in the background
    assert "cam-a" in worker._refit_jobs
    worker._refit_jobs["cam-a"].exception(timeout=120)
    after = worker.score(frames[32:], images[32:])
    assert after.refits == {"cam-a": {"accepted": 1}} and after.swaps == {"cam-a": 1}
    assert set(after.model_versions.values()) == {2} and directory.versions("cam-a") == [1, 2]
    assert after.skipped == {} and np.isfinite(after.scores).all()
    worker.close()


def test_a_refit_with_too_few_normal_frames_is_skipped_and_a_failed_one_keeps_the_head(
    directory: CameraHeads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _refit_worker(tmp_path, min_frames=30)
    frames, images = camera_frames("cam-a", 1, 24, start=24)
    worker.score(frames[:12], images[:12])
    time.sleep(0.25)
    skipped = worker.score(frames[12:], images[12:])  # due, with fewer than 30 normal frames kept
    assert skipped.refits == {"cam-a": {"skipped": 1}} and not worker._refit_jobs
    worker.close()

    worker = _refit_worker(tmp_path)

    def broken_fit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory while fitting")

    monkeypatch.setattr(worker.heads, "fit_head", broken_fit)
    worker.score(frames[:12], images[:12])
    time.sleep(0.25)
    worker.score(frames[12:], images[12:])
    worker._refit_jobs["cam-a"].exception(timeout=60)
    after = worker.score(frames[:4], images[:4])
    assert after.refits == {"cam-a": {"failed": 1}} and after.swaps == {}
    assert set(after.model_versions.values()) == {1} and np.isfinite(after.scores).all()
    worker.close()


def test_the_refit_guard_rejects_a_head_that_alerts_on_held_back_normal_frames(
    directory: CameraHeads, tmp_path: Path
) -> None:
    worker = _refit_worker(tmp_path)
    current = worker.heads.get("cam-a")
    assert current is not None
    # Frames of another scene (cam-b's) in the sample: a head learnt on most of them and checked on the
    # rest. Against scene A's own frames the guard compares the two heads' alert rates directly.
    _, a_images = camera_frames("cam-a", 1, 12, start=24)
    x = worker.images_to_tensor(a_images)
    assert worker._alert_rate(current.model, x) == 0.0
    _, b_images = camera_frames("cam-b", 2, 24, start=24)
    accepted = worker._guarded_refit("cam-a", b_images, current.model)
    assert accepted is not None  # on its own held-back frames (scene B) the new head alerts no more
    assert worker._alert_rate(accepted.model, x) > 0  # ... though it no longer knows scene A
    # A sample mixing scenes, where the held-back frames are the other scene's: rejected, nothing written.
    worker = _refit_worker(tmp_path, val_fraction=0.5)
    mixed = np.concatenate([b_images[:12], a_images])
    versions = directory.versions("cam-a")
    rejected = worker._guarded_refit_split("cam-a", mixed[:12], mixed[12:], current.model)
    assert rejected is None and directory.versions("cam-a") == versions
    worker.close()


def test_refit_config_checks() -> None:
    base = {"sources": [{"type": "synthetic"}]}
    with pytest.raises(ConfigError, match=r"refit\.every.*model\.scope: camera"):
        parse_config({**base, "refit": {"every": 60}})
    camera = {**base, "model": {"scope": "camera"}}
    assert parse_config({**camera, "refit": {"every": "6h"}}).refit.every == 6 * 3600
    assert parse_config({**camera, "refit": {"every": "30m"}}).refit.every == 1800
    with pytest.raises(ConfigError, match=r"not a duration"):
        parse_config({**camera, "refit": {"every": "soon"}})


def test_groups_share_a_head_and_an_overlap_is_a_config_error(tmp_path: Path) -> None:
    cfg = model_config(tmp_path, groups=[{"name": "docks", "cameras": "dock-*"}, {"name": "gate", "cameras": ["g1"]}])
    assert cfg.head_key("dock-3") == "group:docks" and cfg.head_key("g1") == "group:gate" and cfg.head_key("x") == "x"
    with pytest.raises(ValueError, match=r"camera 'dock-1' matches both group 'docks' and group 'first'"):
        model_config(
            tmp_path, groups=[{"name": "docks", "cameras": "re:dock-[0-9]+"}, {"name": "first", "cameras": ["dock-1"]}]
        )
    overlapping = model_config(tmp_path, groups=[{"name": "a", "cameras": "cam-*"}, {"name": "b", "cameras": "*-1"}])
    with pytest.raises(ConfigError, match=r"'cam-1' matches both group 'a' and group 'b'"):
        overlapping.head_key("cam-1")
    raw = {
        "sources": [{"type": "synthetic", "camera_id": "cam-1"}],
        "model": {"scope": "camera", "groups": [{"name": "a", "cameras": "cam-*"}, {"name": "b", "cameras": "*-1"}]},
    }
    with pytest.raises(ConfigError, match=r"model.*'cam-1' matches both group 'a' and group 'b'"):
        parse_config(raw)


def test_camera_scope_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'draem' does not.*padim"):
        ModelConfig(name="draem", scope="camera")
    with pytest.raises(ValueError, match=r"on_missing: default needs model\.default"):
        model_config(tmp_path, on_missing="default")
    base = {"sources": [{"type": "synthetic"}], "model": {"scope": "camera"}}
    assert parse_config(base).model.on_missing == "skip"
    assert parse_config({**base, "fit": {"auto": True}}).model.on_missing == "fit"


def test_refitting_a_camera_with_no_frames_keeps_its_head(directory: CameraHeads, tmp_path: Path) -> None:
    raw = {
        "sources": [
            {"type": "synthetic", "camera_id": "cam-a", "width": SIZE, "height": SIZE, "seed": 1, "num_frames": 30},
            {"type": "synthetic", "camera_id": "cam-b", "width": SIZE, "height": SIZE, "seed": 2, "num_frames": 30},
        ],
        "fit": {"max_frames": 12, "batch_size": 8, "val_fraction": 0.34},
        "model": {**model_config(tmp_path).model_dump(), "params": PARAMS},
    }
    cfg = parse_config(raw)
    with pytest.raises(FitError, match=r"camera 'cam-z': 0 frame\(s\).*its head v1 stays|camera 'cam-z'.*no head yet"):
        fit_camera_heads(cfg, ["cam-z"], progress=False)
    fitted = fit_camera_heads(cfg, ["cam-a"], progress=False)
    assert list(fitted) == ["cam-a"] and fitted["cam-a"].version == 2  # a new version; cam-b untouched
    assert directory.versions("cam-a") == [1, 2] and directory.versions("cam-b") == [1]


def test_alert_events_carry_the_head_version_and_metrics_follow_the_heads() -> None:
    sink = Recorder()
    results = handler([sink])
    batch = frames(4)
    res = BatchResult(
        np.array([0.1, 0.9, 0.9, 0.9], np.float32),
        None,
        None,
        0.01,
        "padim",
        model_versions={0: 3, 1: 3, 2: 3, 3: 3},
        camera_models={"cam": {"version": 3, "fitted_at": 1234.0, "fit_progress": 1.0}},
        swaps={"cam": 2},
        refits={"cam": {"accepted": 1, "rejected": 2}},
        head_bytes=4096,
        worker="w1",
    )
    results.handle(batch, res)
    assert sink.alerts and all(a.model_version == 3 for a in sink.alerts)
    assert sink.alerts[0].record()["model_version"] == 3
    t = results.telemetry
    assert t.model_version.labels("cam")._value.get() == 3 and t.model_fit_timestamp.labels("cam")._value.get() == 1234
    assert t.model_swaps.labels("cam")._value.get() == 2 and t.head_bytes.labels("padim")._value.get() == 4096
    assert t.model_refits.labels("cam", "accepted")._value.get() == 1
    assert t.model_refits.labels("cam", "rejected")._value.get() == 2
