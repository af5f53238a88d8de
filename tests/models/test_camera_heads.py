"""Per-camera heads on one shared backbone: each camera scored by its own fitted normality."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.models.base import CheckpointError, create_model, read_checkpoint
from oddeye.models.camera_heads import CameraHeads, camera_dirname, split_models
from tests.models.helpers import SIZE, add_defect, auroc, normal_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = {"backbone": "resnet18", "pre_trained": False}
PARAMS = {
    "padim": {**TINY, "layers": ["layer1", "layer2"], "n_features": 20},
    "patchcore": {**TINY, "layers": ["layer2"], "coreset_sampling_ratio": 0.2},
    "dfm": {**TINY, "layer": "layer2", "pooling_kernel_size": 2},
    "dfkde": {**TINY, "layers": ["layer2", "layer3"], "n_pca_components": 8},
    "cfa": {**TINY, "layers": ["layer1", "layer2"], "epochs": 2},
}


def scene_b(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Another scene: the stripes turned a quarter and the tint reversed."""
    return normal_images(n, rng).transpose(-1, -2).flip(1).contiguous()


@pytest.fixture(scope="module")
def scenes() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    a_test = normal_images(8, rng)
    return {
        "a": normal_images(24, rng),
        "b": scene_b(24, rng),
        "a_test": a_test,
        "b_test": scene_b(8, rng),
        "a_defect": torch.stack([add_defect(im, "blob", rng)[0] for im in a_test]),
    }


def open_heads(path: Path, name: str, **kw: object) -> CameraHeads:
    torch.manual_seed(0)
    return CameraHeads.open(path, name, PARAMS[name], (SIZE, SIZE), **kw)


def test_the_split_models() -> None:
    assert {"padim", "patchcore", "dfm", "dfkde", "cfa"} <= set(split_models())
    assert "draem" not in split_models()  # trained end to end: one module per camera, not a shared backbone


@pytest.mark.parametrize("name", list(PARAMS))
def test_mixed_batch_scores_each_frame_with_its_own_camera_head(
    name: str, scenes: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    heads = open_heads(tmp_path, name)
    for key, images in (("dock", scenes["a"]), ("corridor", scenes["b"])):
        head = heads.fit_head(images.split(8), folds=3)
        assert head.backbone_module() is heads.template.backbone_module()  # shared, not copied
        assert not any(k.startswith("feature_extractor.") for k in head.head_state())
        heads.save_head(key, head)
    a, b, d = scenes["a_test"], scenes["b_test"], scenes["a_defect"]
    n = len(a)
    batch = torch.cat([a, b, d, a])
    keys = ["dock"] * n + ["corridor"] * n + ["dock"] * n + ["corridor"] * n
    pred, versions = heads.predict(batch, keys)
    own_a, own_b, defect, a_under_b = pred.score.split(n)
    assert versions == [1] * len(keys)
    # Each camera's normal frames are normal under its own head ...
    assert own_a.median() < 0.5 and own_b.median() < 0.5
    # ... a dock frame is far from normal for the corridor's head, and a defect stands out on the dock.
    assert a_under_b.median() > own_a.max()
    assert auroc(own_a, defect) >= 0.75
    # One mixed batch gives what scoring each camera alone gives.
    alone, _ = heads.predict(a, ["dock"] * n)
    torch.testing.assert_close(alone.score, own_a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(PARAMS))
def test_batched_heads_score_a_mixed_batch_as_each_camera_alone(
    name: str, scenes: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Three cameras with their own heads in one interleaved batch: the batched pass over every head present
    gives each frame what its camera's head gives it alone (the per-camera path), scores and maps."""
    heads = open_heads(tmp_path, name)
    fits = {"dock": scenes["a"], "corridor": scenes["b"], "belt": scenes["a"].flip(-2)[:16]}  # upside down, fewer
    for key, images in fits.items():
        heads.save_head(key, heads.fit_head(images.split(8), folds=3))
    tests = {"dock": scenes["a_defect"][:4], "corridor": scenes["b_test"][:2], "belt": scenes["a_test"].flip(-2)[:3]}
    order = ["belt", "dock", "dock", "corridor", "belt", "dock", "belt", "corridor", "dock"]  # uneven, interleaved
    taken = dict.fromkeys(tests, 0)
    batch = []
    for key in order:
        batch.append(tests[key][taken[key]])
        taken[key] += 1
    pred, versions = heads.predict(torch.stack(batch), order)
    assert versions == [1] * len(order)
    for key in tests:
        rows = [i for i, k in enumerate(order) if k == key]
        alone = heads.get(key).model(torch.stack(batch)[rows])  # this head only: backbone, head, normalisation
        torch.testing.assert_close(pred.score[rows], alone.score, rtol=0, atol=1e-4)
        if alone.anomaly_map is not None:
            torch.testing.assert_close(pred.anomaly_map[rows], alone.anomaly_map, rtol=0, atol=1e-4)
    # The scores differ by camera: each frame met its own head, not the first one's.
    assert len({round(float(v), 4) for v in pred.score}) > 3
    # Every split model but DFKDE (a KDE, PCA and scaling of its own per camera) scores the heads in one pass.
    models = [heads.get(k).model for k in tests]
    index = torch.tensor([list(tests).index(k) for k in order])
    embedding = heads.template.embed(torch.stack(batch))
    batched = type(heads.template).score_embedding_heads(models, embedding, index, (SIZE, SIZE))
    assert (batched is None) == (name == "dfkde")


@pytest.mark.parametrize("name", ["padim", "patchcore", "cfa"])
def test_fitting_on_cached_features_equals_fitting_on_images(name: str, scenes: dict[str, torch.Tensor]) -> None:
    """A head fits with one backbone pass (the k fold fits reuse the features) and learns the same."""
    torch.manual_seed(0)
    a = create_model(name, image_size=[SIZE, SIZE], **PARAMS[name]).fit(scenes["a"].split(8), folds=3, progress=False)
    torch.manual_seed(0)
    b = create_model(name, image_size=[SIZE, SIZE], **PARAMS[name])
    b.fit_embedded(scenes["a"].split(8), folds=3, progress=False)
    assert not b.embedded_inputs
    batch = torch.cat([scenes["a_test"], scenes["a_defect"]])
    torch.testing.assert_close(b(batch).score, a(batch).score, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.normalizer.threshold, a.normalizer.threshold, rtol=1e-3, atol=1e-6)


def test_heads_reload_from_the_directory_without_the_backbone(scenes: dict[str, torch.Tensor], tmp_path: Path) -> None:
    heads = open_heads(tmp_path / "m", "padim")
    heads.save_head("cam/1 north", heads.fit_head(scenes["a"].split(8), folds=3))
    expected, _ = heads.predict(scenes["a_test"], ["cam/1 north"] * 8)
    head_file = tmp_path / "m" / "cameras" / camera_dirname("cam/1 north") / "v1.pt"
    stored = read_checkpoint(head_file)
    assert stored["head"]["key"] == "cam/1 north" and stored["head"]["version"] == 1
    assert not any(k.startswith("feature_extractor.") for k in stored["state_dict"])  # the backbone is stored once

    again = CameraHeads.open(tmp_path / "m")  # a fresh process: backbone weights come from the directory
    assert again.keys() == ["cam/1 north"]
    got, versions = again.predict(scenes["a_test"], ["cam/1 north"] * 8)
    torch.testing.assert_close(got.score, expected.score)
    assert versions == [1] * 8


def test_float16_heads_are_half_the_size_and_score_alike(scenes: dict[str, torch.Tensor], tmp_path: Path) -> None:
    full = open_heads(tmp_path / "f32", "padim")
    head = full.fit_head(scenes["a"].split(8), folds=3)
    full.save_head("dock", head)
    half = CameraHeads(full.directory, full.template, full.description, head_dtype="float16")
    half.save_head("dock-half", head)
    size = {k: (tmp_path / "f32" / "cameras" / k / "v1.pt").stat().st_size for k in ("dock", "dock-half")}
    assert size["dock-half"] < 0.6 * size["dock"]
    batch = torch.cat([scenes["a_test"], scenes["a_defect"]])
    s32, _ = full.predict(batch, ["dock"] * 16)
    s16, _ = half.predict(batch, ["dock-half"] * 16)
    assert half.get("dock-half").model.gaussian.inv_covariance.dtype == torch.float32  # upcast for scoring
    assert (s16.score - s32.score).abs().max() < 0.05


def test_lru_keeps_heads_within_the_memory_budget(scenes: dict[str, torch.Tensor], tmp_path: Path) -> None:
    heads = open_heads(tmp_path, "dfm")
    for key in ("a", "b", "c"):
        heads.save_head(key, heads.fit_head(scenes["a"].split(8), folds=3))
    one = heads.get("a").nbytes
    small = CameraHeads.open(tmp_path, max_head_bytes=int(one * 2.5))
    small.predict(scenes["a_test"][:6], ["a", "a", "b", "b", "c", "c"])  # lazily loads all three
    assert list(small.loaded()) == ["b", "c"] and small.evictions == 1 and small.head_bytes <= one * 2.5
    small.get("a")  # loaded again on demand, evicting the least recently used
    assert list(small.loaded()) == ["c", "a"]


def test_refresh_swaps_in_a_newer_version(scenes: dict[str, torch.Tensor], tmp_path: Path) -> None:
    heads = open_heads(tmp_path, "dfm")
    heads.save_head("dock", heads.fit_head(scenes["a"].split(8), folds=3))
    running = CameraHeads.open(tmp_path)
    before, _ = running.predict(scenes["b_test"], ["dock"] * 8)
    assert running.refresh() == []
    heads.save_head("dock", heads.fit_head(scenes["b"].split(8), folds=3))  # refitted: the scene changed
    assert running.refresh() == [("dock", 1, 2)]
    after, versions = running.predict(scenes["b_test"], ["dock"] * 8)
    assert versions == [2] * 8 and after.score.mean() < before.score.mean()


def test_a_head_from_another_backbone_is_refused_naming_both(scenes: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ours = open_heads(tmp_path / "ours", "dfm")
    torch.manual_seed(1)
    theirs = CameraHeads.open(tmp_path / "theirs", "dfm", {**PARAMS["dfm"], "layer": "layer3"}, (SIZE, SIZE))
    theirs.save_head("dock", theirs.fit_head(scenes["a"].split(8), folds=3))
    with pytest.raises(CheckpointError, match=r"layer=layer3.*layer=layer2"):
        ours.load_head(tmp_path / "theirs" / "cameras" / "dock" / "v1.pt")
    # Same parameters, other random weights: the weights hash tells them apart.
    torch.manual_seed(2)
    other = CameraHeads.open(tmp_path / "other", "dfm", PARAMS["dfm"], (SIZE, SIZE))
    other.save_head("dock", other.fit_head(scenes["a"].split(8), folds=3))
    with pytest.raises(CheckpointError, match=r"weights [0-9a-f]{12}\).*weights [0-9a-f]{12}\)"):
        ours.load_head(tmp_path / "other" / "cameras" / "dock" / "v1.pt")


def test_a_directory_made_for_other_parameters_is_refused(tmp_path: Path) -> None:
    open_heads(tmp_path, "dfm")
    with pytest.raises(CheckpointError, match=r"holds heads of dfm \(.*layer=layer2.*asks for dfm \(.*layer=layer3"):
        CameraHeads.open(tmp_path, "dfm", {**PARAMS["dfm"], "layer": "layer3"}, (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"does not split.*padim"):
        CameraHeads.open(tmp_path / "draem", "draem", {}, (SIZE, SIZE))
    with pytest.raises(CheckpointError, match="not a model directory"):
        CameraHeads.open(tmp_path / "nothing")
