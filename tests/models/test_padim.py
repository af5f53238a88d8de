"""PaDiM: learns normality from generated textures, finds pasted defects, checkpoints safely."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.models.base import CHECKPOINT_FORMAT, CheckpointError, FitError, create_model, list_models, load_model
from oddeye.models.image.padim import Padim
from tests.models.helpers import SIZE, PicklePayload, add_defect, auroc, normal_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    rng = np.random.default_rng(0)
    normal_test = normal_images(20, rng)
    defects, centres = [], []
    for i in range(20):
        image, centre = add_defect(normal_test[i], "blob" if i % 2 == 0 else "scratch", rng)
        defects.append(image)
        centres.append(centre)
    return {
        "train": normal_images(64, rng),
        "val": normal_images(20, rng),
        "normal": normal_test,
        "defects": torch.stack(defects),
        "centres": centres,
    }


@pytest.fixture(scope="module")
def fitted(data: dict[str, object]) -> Padim:
    torch.manual_seed(0)
    model = Padim(pre_trained=False, n_features=50, image_size=(SIZE, SIZE))
    model.fit(data["train"].split(16), data["val"].split(10), progress=False)
    return model


def test_registered_and_built_by_name() -> None:
    assert "padim" in list_models()
    model = create_model("padim", pre_trained=False, layers=["layer1", "layer2"], image_size=[SIZE, SIZE])
    assert isinstance(model, Padim)
    assert model.n_features == 100  # the paper's default for resnet18
    assert model.config["layers"] == ["layer1", "layer2"]


def test_n_features_defaults_and_limits() -> None:
    assert Padim(pre_trained=False, layers=["layer1"]).n_features == 64  # fewer channels than the default
    with pytest.raises(ValueError, match=r"between 1 and 448"):
        Padim(pre_trained=False, n_features=449)
    a = Padim(pre_trained=False, n_features=30)
    b = Padim(pre_trained=False, n_features=30)
    assert torch.equal(a.idx, b.idx) and a.idx.numel() == 30  # seeded: the same subset every time


def test_detects_defects_above_normal(fitted: Padim, data: dict[str, object]) -> None:
    normal, _ = fitted.raw_forward(data["normal"])
    anomalous, _ = fitted.raw_forward(data["defects"])
    assert auroc(normal, anomalous) >= 0.95
    assert float(anomalous.min()) > float(normal.max())


def test_anomaly_map_peaks_at_defect(fitted: Padim, data: dict[str, object]) -> None:
    pred = fitted(data["defects"])
    assert pred.anomaly_map.shape == (20, SIZE, SIZE)
    distances = []
    for amap, (cy, cx) in zip(pred.anomaly_map, data["centres"], strict=True):
        y, x = divmod(int(amap.argmax()), SIZE)
        distances.append(np.hypot(y - cy, x - cx))
    assert max(distances) <= 12, distances  # a scratch is 20 px long: its peak may sit off-centre


def test_normalised_scores_split_at_half(fitted: Padim, data: dict[str, object]) -> None:
    normal = fitted(data["normal"])
    defects = fitted(data["defects"])
    assert float((normal.score < 0.5).float().mean()) >= 0.8
    assert bool((defects.score > 0.5).all())
    assert defects.label.all()
    assert float(normal.score.min()) >= 0.0 and float(defects.score.max()) <= 1.0


def test_accepts_uint8_and_batches_independently(fitted: Padim, data: dict[str, object]) -> None:
    images = data["defects"][:4]
    together = fitted(images).score
    alone = torch.cat([fitted(images[i : i + 1]).score for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert fitted(as_uint8).score.shape == (4,)


def test_save_load_round_trip(fitted: Padim, data: dict[str, object], tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "padim.ckpt")
    loaded = Padim.load(path)
    assert isinstance(loaded, Padim) and loaded.fitted and not loaded.training
    assert torch.equal(loaded.idx, fitted.idx)
    images = torch.cat([data["normal"][:3], data["defects"][:3]])
    before, after = fitted(images), loaded(images)
    assert torch.equal(before.score, after.score)
    assert torch.equal(before.anomaly_map, after.anomaly_map)
    assert isinstance(load_model(path), Padim)


def test_load_refuses_another_models_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": "other", "config": {}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="other"):
        Padim.load(path)


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    ckpt = {"format": CHECKPOINT_FORMAT, "model": "padim", "config": {}, "state_dict": {}, "x": PicklePayload(marker)}
    zipped = tmp_path / "zipped.ckpt"
    torch.save(ckpt, zipped)
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps(ckpt, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError):
            Padim.load(path)
    assert not marker.exists()
    pickle.loads(legacy.read_bytes())  # the payload is real: a plain unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02", b"not a checkpoint"])
def test_load_refuses_empty_or_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a loadable"):
        Padim.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Padim.load(tmp_path / "missing.ckpt")


def test_fit_on_empty_loader_fails() -> None:
    model = Padim(pre_trained=False, n_features=10, image_size=(SIZE, SIZE))
    with pytest.raises(FitError, match="no images"):
        model.fit([], progress=False)
    assert not model.fitted


def test_fit_on_wrong_image_size_fails() -> None:
    model = Padim(pre_trained=False, n_features=10, image_size=(SIZE, SIZE))
    with pytest.raises(FitError, match="image_size"):
        model.fit([torch.rand(2, 3, 32, 32)], progress=False)


def test_fit_is_independent_of_batching(data: dict[str, object]) -> None:
    # Fitting keeps running sums, not embeddings: the same Gaussian whatever the batching.
    a = Padim(pre_trained=False, n_features=20, layers=["layer1", "layer2"], image_size=(SIZE, SIZE))
    b = Padim(pre_trained=False, n_features=20, layers=["layer1", "layer2"], image_size=(SIZE, SIZE))
    b.load_state_dict(a.state_dict(), strict=False)
    train = data["train"][:24]
    a.fit(train.split(24), progress=False)
    b.fit(train.split(5), progress=False)
    torch.testing.assert_close(a.gaussian.mean, b.gaussian.mean)
    torch.testing.assert_close(a.gaussian.inv_covariance, b.gaussian.inv_covariance, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(data: dict[str, object]) -> None:
    model = Padim(pre_trained=False, n_features=50, image_size=(SIZE, SIZE)).to("cuda")
    model.fit(data["train"].split(16), data["val"].split(10), progress=False)  # CPU batches are moved
    pred = model(data["defects"].cuda())
    assert pred.score.device.type == "cuda" and pred.anomaly_map.shape == (20, SIZE, SIZE)
    cpu = Padim(pre_trained=False, n_features=50, image_size=(SIZE, SIZE))
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu.fitted = True
    torch.testing.assert_close(cpu(data["defects"]).score, pred.score.cpu(), rtol=1e-3, atol=1e-3)
