"""WinCLIP with a tiny random open_clip network: prompts, windows, harmonic aggregation, few-shot, checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from oddeye.models.base import FitError, list_models, model_params
from oddeye.models.image.winclip import WinClip, harmonic_aggregation, window_indices
from tests.models.helpers import assert_round_trip

open_clip = pytest.importorskip("open_clip")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY = "oddeye-test-tiny-clip"
# A one-block CLIP at 64 px (a 4 x 4 patch grid): mechanics, not accuracy.
open_clip.factory._MODEL_CONFIGS.setdefault(
    TINY,
    {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
)
SIZE = 64


def tiny(**kw: object) -> WinClip:
    torch.manual_seed(0)
    return WinClip(backbone=TINY, pre_trained=False, image_size=(SIZE, SIZE), **kw)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def write_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"ref{i}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def test_registered_with_anomalib_defaults() -> None:
    assert "winclip" in list_models()
    defaults = model_params("winclip")
    assert defaults["class_name"] is None and defaults["k_shot"] == 0
    assert tuple(defaults["scales"]) == (2, 3) and defaults["few_shot_source"] is None
    assert defaults["backbone"] == "ViT-B-16-plus-240" and defaults["pretrained"] == "laion400m_e31"


def test_window_indices_and_harmonic_aggregation() -> None:
    windows = window_indices((3, 3), 2)
    assert windows.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[0.2, 0.4, 0.5, 1.0]])
    patch = harmonic_aggregation(scores, windows, 9)
    assert patch[0, 0] == pytest.approx(0.2)  # one window
    assert patch[0, 1] == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))
    assert patch[0, 4] == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1))  # the centre: all four
    with pytest.raises(ValueError, match="larger than the 3 x 3"):
        window_indices((3, 3), 4)


def test_a_window_over_the_whole_grid_is_the_image_embedding(images: torch.Tensor) -> None:
    model = tiny(scales=(2, 4))  # 4 x 4: one window holding every patch
    image, windows, patches = model.encode_image(images)
    assert windows[0].shape == (3, 9, 32) and windows[1].shape == (3, 1, 32) and patches.shape == (3, 16, 32)
    torch.testing.assert_close(windows[1][:, 0], image, rtol=1e-4, atol=1e-5)


def test_prompt_ensemble_uses_class_name_or_a_generic_prompt(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="oddeye.models.image.winclip"):
        generic = tiny()
    assert generic.class_name == "object" and "no class_name" in caplog.text
    bottle = tiny(class_name="bottle")
    assert bottle.text_embeddings.shape == (2, 32)
    torch.testing.assert_close(bottle.text_embeddings.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(bottle.text_embeddings, generic.text_embeddings)


def test_zero_shot_needs_no_fit_and_round_trips(images: torch.Tensor, tmp_path: Path) -> None:
    model = tiny(class_name="bottle")
    assert not model.needs_fit
    model.prepare()
    pred = model(images)
    assert pred.score.shape == (3,) and pred.anomaly_map.shape == (3, SIZE, SIZE)
    raw, _ = model.raw_forward(images)
    assert ((raw >= 0) & (raw <= 1)).all()
    torch.testing.assert_close(pred.score, torch.sigmoid((raw - 0.5) / 0.1))  # 0.5 stays 0.5
    loaded = assert_round_trip(model, images, tmp_path / "winclip.pt")
    assert loaded.class_name == "bottle"


def test_few_shot_from_a_folder(images: torch.Tensor, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "refs", 3)
    model = tiny(class_name="bottle", k_shot=2, few_shot_source=str(folder))
    assert not model.needs_fit
    model.prepare()
    assert model.ref_patches.shape == (2 * 16, 32) and model.ref_windows_0.shape == (2 * 9, 32)
    zero = tiny(class_name="bottle").prepare()
    assert not torch.equal(model.raw_forward(images)[0], zero.raw_forward(images)[0])
    # A reference image is its own nearest neighbour: its few-shot distances are zero.
    from oddeye.data.images import list_images, load_images

    ref = torch.from_numpy(load_images(list_images(folder)[:1], (SIZE, SIZE))).permute(0, 3, 1, 2).float() / 255
    _, _, patches = model.encode_image(ref)
    assert float((1 - (patches[0] @ model.ref_patches.T).amax(-1)).abs().max()) < 1e-4
    assert_round_trip(model, images, tmp_path / "few.pt")


def test_few_shot_from_the_fit_data(images: torch.Tensor) -> None:
    model = tiny(class_name="bottle", k_shot=2)
    assert model.needs_fit
    model.fit([images[:1], images[1:]], progress=False)
    assert model.fitted and model.ref_patches.shape == (2 * 16, 32)
    _, _, first_two = model.encode_image(images[:2])  # the references are the first fit images
    torch.testing.assert_close(model.ref_patches, first_two.flatten(0, 1))
    assert model(images).score.shape == (3,)


def test_few_shot_without_references_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"k_shot=2 with an empty few_shot_source"):
        tiny(k_shot=2, few_shot_source="")
    with pytest.raises(FitError, match=r"holds 1 image\(s\); k_shot=2"):
        tiny(k_shot=2, few_shot_source=str(write_folder(tmp_path / "one", 1))).prepare()
    with pytest.raises(FitError, match="set few_shot_source"):
        tiny(k_shot=2).prepare()
    with pytest.raises(FitError, match="k_shot=3 needs that many"):
        tiny(k_shot=3).fit([torch.rand(2, 3, SIZE, SIZE)], progress=False)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="input size"):
        WinClip(backbone=TINY, pre_trained=False, image_size=(96, 96))
    with pytest.raises(ValueError, match="unknown CLIP backbone"):
        WinClip(backbone="no-such-clip", pre_trained=False)
    with pytest.raises(ValueError, match="k_shot must be 0"):
        tiny(k_shot=-1)


def test_zero_shot_config_is_prepared_without_reading_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oddeye.config import load_config
    from oddeye.models.base import load_model
    from oddeye.pipeline import fit

    def no_frames(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zero-shot model read fit frames")

    monkeypatch.setattr(fit, "collect_fit_images", no_frames)
    overrides = [
        f"model.params.backbone={TINY}",
        "model.params.pre_trained=false",
        f"model.image_size=[{SIZE},{SIZE}]",
        f"model.checkpoint={tmp_path / 'winclip.pt'}",
    ]
    cfg = load_config(Path(__file__).parents[2] / "configs" / "winclip.yaml", overrides)
    assert cfg.fit.auto  # `oddeye run` prepares it when the checkpoint is missing
    model, path = fit.fit_from_config(cfg, progress=False)
    assert path.is_file() and isinstance(load_model(path), WinClip)
    assert model(torch.rand(2, 3, SIZE, SIZE)).score.shape == (2,)
