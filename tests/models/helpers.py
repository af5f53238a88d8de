"""Generated data and shared checks for the image model tests (no downloads, no files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.models.base import CHECKPOINT_FORMAT, AnomalyModel, CheckpointError, FitError

SIZE = 64


def normal_images(n: int, rng: np.random.Generator, size: int = SIZE) -> torch.Tensor:
    """Striped texture with small random shifts and pixel noise, [n, 3, size, size] in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tint = np.array([1.0, 0.9, 0.8], np.float32)[:, None, None]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        dx, dy = rng.uniform(-1.5, 1.5, size=2)
        base = 0.5 + 0.2 * np.sin(2 * np.pi * (xx + dx) / 8) + 0.1 * np.sin(2 * np.pi * (yy + dy) / 16)
        out[i] = base[None] * tint + rng.normal(0, 0.02, size=(3, size, size))
    return torch.from_numpy(np.clip(out, 0, 1))


def add_defect(image: torch.Tensor, kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Paste a bright blob or a dark scratch; returns the image and the defect's centre (y, x)."""
    size = image.shape[-1]
    image = image.clone()
    margin = size // 4
    cy, cx = (int(v) for v in rng.integers(margin, size - margin, size=2))
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "blob":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2
        value = 1.0
    else:
        angle, t = rng.uniform(0, np.pi), np.linspace(-10, 10, 80)
        ys = np.clip(np.round(cy + t * np.sin(angle)).astype(int), 0, size - 2)
        xs = np.clip(np.round(cx + t * np.cos(angle)).astype(int), 0, size - 1)
        mask = np.zeros((size, size), bool)
        mask[ys, xs] = mask[ys + 1, xs] = True
        value = 0.0
    image[:, torch.from_numpy(mask)] = value
    return image, (cy, cx)


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """Probability that an anomalous score beats a normal one (ties count half)."""
    diff = anomalous[:, None] - normal[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def defect_data(n_train: int = 64, n_val: int = 20, n_test: int = 20, size: int = SIZE, seed: int = 0) -> dict:
    """Training/validation normals, held-out normals, and the same held-out frames with defects."""
    rng = np.random.default_rng(seed)
    normal_test = normal_images(n_test, rng, size)
    defects, centres = [], []
    for i in range(n_test):
        image, centre = add_defect(normal_test[i], "blob" if i % 2 == 0 else "scratch", rng)
        defects.append(image)
        centres.append(centre)
    return {
        "train": normal_images(n_train, rng, size),
        "val": normal_images(n_val, rng, size),
        "normal": normal_test,
        "defects": torch.stack(defects),
        "centres": centres,
    }


def map_peak_distances(anomaly_map: torch.Tensor, centres: list[tuple[int, int]]) -> list[float]:
    """Pixel distance from each map's maximum to its defect centre."""
    width = anomaly_map.shape[-1]
    out = []
    for amap, (cy, cx) in zip(anomaly_map, centres, strict=True):
        y, x = divmod(int(amap.argmax()), width)
        out.append(float(np.hypot(y - cy, x - cx)))
    return out


def assert_round_trip(model: AnomalyModel, images: torch.Tensor, path: Path) -> AnomalyModel:
    """Save, load (by class and by name), and check identical scores and maps."""
    from oddeye.models.base import load_model

    model.save(path)
    loaded = type(model).load(path)
    assert isinstance(loaded, type(model)) and loaded.fitted and not loaded.training
    before, after = model(images), loaded(images)
    assert torch.equal(before.score, after.score)
    if before.anomaly_map is None:
        assert after.anomaly_map is None
    else:
        assert torch.equal(before.anomaly_map, after.anomaly_map)
    assert isinstance(load_model(path), type(model))
    return loaded


class PicklePayload:
    """Unpickling this would create ``marker``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def assert_refuses_bad_checkpoints(cls: type[AnomalyModel], tmp_path: Path) -> None:
    """A checkpoint of another model, a pickle payload, garbage: each a CheckpointError, no code run."""
    other = tmp_path / "other.ckpt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": "padim", "config": {}, "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="padim"):
        cls.load(other)

    marker = tmp_path / "payload-ran"
    ckpt = {"format": CHECKPOINT_FORMAT, "model": cls.name, "config": {}, "state_dict": {}, "x": PicklePayload(marker)}
    zipped, legacy = tmp_path / "zipped.ckpt", tmp_path / "legacy.ckpt"
    torch.save(ckpt, zipped)
    legacy.write_bytes(pickle.dumps(ckpt, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError):
            cls.load(path)
    assert not marker.exists()

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        cls.load(garbage)


def assert_refuses_bad_fit_input(model: AnomalyModel, size: int = SIZE) -> None:
    """Fitting on no images or on images of another size fails clearly and leaves the model unfitted."""
    with pytest.raises(FitError, match="no images"):
        model.fit([], progress=False)
    with pytest.raises(FitError, match="image_size"):
        model.fit([torch.rand(2, 3, size, size), torch.rand(2, 3, size // 2, size // 2)], progress=False)
    assert not model.fitted
