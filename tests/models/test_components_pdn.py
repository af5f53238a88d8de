"""EfficientAd's networks, teacher files, natural-image pools and teacher distillation."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from oddeye.cli import main
from oddeye.models.base import FitError
from oddeye.models.components.feature_extractor import TimmFeatureExtractor
from oddeye.models.components.natural_images import NaturalImages
from oddeye.models.components.pdn import (
    PDN,
    PDNAutoencoder,
    TeacherFileError,
    pdn_out_size,
    read_teacher_file,
    write_teacher_file,
)
from oddeye.models.teacher_distillation import TeacherTarget, distill_teacher

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.mark.parametrize(("size", "padding"), [(64, False), (48, True)])
@pytest.mark.parametrize("model_size", ["small", "M"])
def test_pdn_and_autoencoder_shapes(size: int, padding: bool, model_size: str) -> None:
    pdn = PDN(8, model_size, padding)
    ae = PDNAutoencoder(8, (size, size), padding)
    x = torch.rand(1, 3, size, size)
    side = pdn_out_size(size, padding)
    assert pdn(x).shape == ae(x).shape == (1, 8, side, side)
    assert pdn_out_size(256, False) == 56 and pdn_out_size(256, True) == 64  # the paper's grids
    with pytest.raises(ValueError, match=r"model_size must be one of \['small', 'medium'\]"):
        PDN(8, "large")


def test_teacher_file_round_trip_and_mismatch(tmp_path: Path) -> None:
    teacher = PDN(8, "small")
    path = write_teacher_file(tmp_path / "t.pt", teacher, {"backbone": "resnet18"})
    assert torch.load(path, weights_only=True)["meta"] == {"backbone": "resnet18"}
    state = read_teacher_file(path, "S", 8)
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(TeacherFileError, match=r"model_size='small'.*teacher_out_channels=8.*model_size='medium'"):
        read_teacher_file(path, "medium", 8)
    with pytest.raises(TeacherFileError, match=r"teacher_out_channels=8, but .*teacher_out_channels=384"):
        read_teacher_file(path, "small", 384)
    assert issubclass(TeacherFileError, FitError)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(TeacherFileError, match="not an oddeye teacher file"):
        read_teacher_file(tmp_path / "other.pt", "small", 8)
    with pytest.raises(TeacherFileError, match="does not exist"):
        read_teacher_file(tmp_path / "missing.pt", "small", 8)


def _write_photos(folder: Path, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / "sub" / f"{i}.png"), rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8))


def test_natural_images(tmp_path: Path) -> None:
    _write_photos(tmp_path / "photos")
    pool = NaturalImages.from_folder(tmp_path / "photos")
    assert len(pool) == 3
    x = pool.sample(4, (24, 32), np.random.default_rng(0))
    assert x.shape == (4, 3, 24, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        NaturalImages.from_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NaturalImages.from_folder(tmp_path / "missing")
    assert NaturalImages.bundled().sample(2, (16, 16), np.random.default_rng(0)).shape == (2, 3, 16, 16)


def test_target_and_distillation(tmp_path: Path) -> None:
    extractor = TimmFeatureExtractor("resnet18", ["layer1", "layer2"], pre_trained=False)
    with pytest.raises(ValueError, match=r"192 channels, fewer than teacher_out_channels=384"):
        TeacherTarget(extractor, 384)
    target = TeacherTarget(extractor, 16)
    assert target(torch.rand(2, 3, 48, 48), (4, 4)).shape == (2, 16, 4, 4)
    _write_photos(tmp_path / "photos")
    result = distill_teacher(
        target, NaturalImages.from_folder(tmp_path / "photos"), crop_size=48, steps=3, batch_size=2, progress=False
    )
    assert result.steps == 3 and np.isfinite(result.last_loss)
    assert result.teacher.out_channels == 16


def test_distill_teacher_command(tmp_path: Path) -> None:
    _write_photos(tmp_path / "photos")
    out = tmp_path / "teacher_s.pt"
    argv = [
        "distill-teacher",
        "--backbone",
        "resnet18",
        "--layers",
        "layer1",
        "layer2",
        "--images",
        str(tmp_path / "photos"),
        "--out",
        str(out),
        "--teacher-out-channels",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        "48",
        "--device",
        "cpu",
    ]
    env = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        # resnet18 without --weights would download: refused offline with a clear message, nothing written
        assert main(argv) == 2 and not out.exists()
    finally:
        os.environ["HF_HUB_OFFLINE"] = env or "1"
    state_file = tmp_path / "resnet18.pt"
    torch.save(
        TimmFeatureExtractor("resnet18", ["layer1", "layer2"], pre_trained=False).feature_extractor.state_dict(),
        state_file,
    )
    assert main([*argv, "--weights", str(state_file)]) == 0
    assert read_teacher_file(out, "small", 32).keys() == PDN(32).state_dict().keys()
    (tmp_path / "empty").mkdir()
    assert main([*argv[:-1], "cpu", "--weights", str(state_file), "--images", str(tmp_path / "empty")]) == 2
    # `--images bundled`: scikit-image's photos, no folder needed
    out.unlink()
    assert main([*argv, "--weights", str(state_file), "--images", "bundled"]) == 0
    assert read_teacher_file(out, "small", 32).keys() == PDN(32).state_dict().keys()
