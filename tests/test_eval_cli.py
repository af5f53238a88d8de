"""`oddeye eval` and `oddeye fit --data` end to end on tiny synthetic data with a random backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from oddeye.cli import main
from oddeye.data.synth import SynthImageSpec, write_image_benchmark
from oddeye.data.synth_video import SynthVideoSpec, write_video_benchmark


def _config(tmp: Path) -> Path:
    raw = {
        "sources": [{"type": "images", "path": str(tmp)}],
        "fit": {"max_frames": 100, "batch_size": 8, "val_fraction": 0.25},
        "model": {
            "name": "padim",
            "image_size": [64, 64],
            "device": "cpu",
            "checkpoint": str(tmp / "ckpt" / "{category}.pt"),
            "params": {"backbone": "resnet18", "layers": ["layer1", "layer2"], "pre_trained": False, "n_features": 32},
        },
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_image_benchmark(
        root,
        seed=0,
        spec=SynthImageSpec(size=64, train=12, test_good=4, test_per_defect=2),
        categories=["brick", "coffee"],
    )
    return root


def test_fit_data_then_eval_folder_of_categories(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _config(tmp_path)
    assert main(["fit", str(cfg), "--data", str(images / "brick")]) == 0
    assert (tmp_path / "ckpt" / "brick.pt").is_file()
    assert not (tmp_path / "ckpt" / "coffee.pt").exists()
    capsys.readouterr()
    out_json = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            str(cfg),
            "--data",
            str(images),
            "--json",
            str(out_json),
            "--save-images",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "mean" in printed and "coffee" in printed
    report = json.loads(out_json.read_text())
    assert set(report["categories"]) == {"brick", "coffee"}
    for rec in [*report["categories"].values(), report["mean"]]:
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
            assert 0.0 <= rec[key] <= 1.0, key
    assert report["categories"]["brick"]["fit_seconds"] is None  # loaded, not refitted
    assert (tmp_path / "ckpt" / "coffee.pt").is_file()  # fitted because it was missing
    shots = list((tmp_path / "ev" / "coffee").rglob("*.jpg"))
    assert {p.parent.name for p in shots} == {"false_positives", "false_negatives"}


def test_eval_video_scenes_with_an_image_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = SynthVideoSpec(width=64, height=48, scenes=1, train_clips=1, test_clips=3, frames=24, walkers=2)
    write_video_benchmark(tmp_path / "video", spec=spec)
    out_json = tmp_path / "v.json"
    assert main(["eval", str(_config(tmp_path)), "--data", str(tmp_path / "video"), "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    rec = report["categories"]["scene01"]
    assert 0 <= rec["frame_auroc_micro"] <= 1 and rec["clips_used"] + rec["clips_skipped"] == 3
    assert "frame_auroc_macro" in report["mean"]


def test_eval_bad_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(_config(tmp_path)), "--data", str(tmp_path / "empty")]) == 1
    assert "neither a dataset category nor a folder of categories" in capsys.readouterr().err
    assert main(["fit", str(_config(tmp_path)), "--data", str(tmp_path / "empty")]) == 1
    assert "not a dataset category" in capsys.readouterr().err


def test_fit_one_category_keeps_the_users_checkpoint_path(tmp_path: Path, images: Path) -> None:
    """`fit --data D/images/brick --set model.checkpoint=X.pt` writes X.pt: `run`/`eval` with that --set find it."""
    cfg = _config(tmp_path)
    ckpt = tmp_path / "X.pt"
    assert main(["fit", str(cfg), "--data", str(images / "brick"), "--set", f"model.checkpoint={ckpt}"]) == 0
    assert ckpt.is_file() and not (tmp_path / "X-brick.pt").exists()
    out_json = tmp_path / "r.json"
    argv = ["eval", str(cfg), "--data", str(images / "brick"), "--set", f"model.checkpoint={ckpt}"]
    assert main([*argv, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["categories"]["brick"]["fit_seconds"] is None  # loaded X.pt
