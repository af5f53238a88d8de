"""oddeye export: ONNX and TorchScript round trips of PaDiM and PatchCore reproduce the checkpoint's scores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.cli import main
from oddeye.commands.export import ExportError, export_model, load_exported
from oddeye.models.base import load_model
from oddeye.models.image.padim import Padim
from oddeye.models.image.patchcore import Patchcore
from tests.models.helpers import defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

SIZE = 32
BATCH = 2


@pytest.fixture(scope="module")
def data() -> dict:
    return defect_data(n_train=16, n_val=6, n_test=4, size=SIZE)


def _fit(name: str, data: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "padim":
        model = Padim(pre_trained=False, layers=["layer1", "layer2"], n_features=12, image_size=(SIZE, SIZE))
    else:
        model = Patchcore(pre_trained=False, layers=["layer2"], coreset_sampling_ratio=0.25, image_size=(SIZE, SIZE))
    return model.fit(data["train"].split(8), data["val"].split(6), progress=False)


@pytest.fixture(scope="module")
def checkpoints(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: _fit(name, data).save(root / f"{name}.pt") for name in ("padim", "patchcore")}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_round_trip_matches_the_checkpoint(
    name: str, fmt: str, checkpoints: dict[str, Path], data: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}"
    argv = ["export", str(checkpoints[name]), "--format", fmt, "--out", str(out), "--batch-size", str(BATCH)]
    assert main(argv) == 0
    assert "checked:" in capsys.readouterr().out
    model = load_model(checkpoints[name])
    exported = load_exported(out, fmt)
    # Held-out normal images and defects, not the random images the command checked itself.
    for images in (data["normal"][:BATCH], data["defects"][:BATCH]):
        expected = model(images)
        score, amap = exported(images)
        np.testing.assert_allclose(score, expected.score.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(amap, expected.anomaly_map.numpy(), atol=1e-4, rtol=0)
        assert amap.shape == (BATCH, SIZE, SIZE)
    # The export still tells defects from normal images, as the checkpoint does.
    normal, defect = exported(data["normal"][:BATCH])[0], exported(data["defects"][:BATCH])[0]
    assert float(np.max(defect)) > float(np.min(normal))


def test_bad_arguments(checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", str(checkpoints["padim"]), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    args = ["export", str(checkpoints["padim"]), "--format", "torchscript", "--out", str(tmp_path / "x")]
    assert main([*args, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"format must be one of \['onnx', 'torchscript'\]"):
        export_model(load_model(checkpoints["padim"]), "tflite", tmp_path / "x")
