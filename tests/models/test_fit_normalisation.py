"""AnomalyModel.fit: the model learns from every image, the normaliser from images it did not see.

A nearest-neighbour memory bank is the hardest case: it scores its own training images 0,
so normalising on them (or on a validation frame with a near-copy in training) puts the
threshold far too low and every unseen normal frame looks anomalous.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from oddeye.config import OddeyeConfig
from oddeye.models.base import AnomalyModel, FitError, fold_assignment
from oddeye.pipeline import fit as fit_module


class NearestImage(AnomalyModel):
    """Memory bank of whole images: raw score = distance to the nearest training image; map = that
    image's per-pixel difference, scaled down like a DFM map cell is against its image score."""

    def __init__(self, image_size: tuple[int, int] | list[int] = (8, 8), n_features: int | None = None) -> None:
        super().__init__(image_size=image_size)
        self.register_buffer("bank", torch.zeros(0))
        self.fit_sizes: list[int] = []

    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        self.bank = torch.cat([b.flatten(1) for b in batches])
        self.fit_sizes.append(self.bank.shape[0])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        self.bank = torch.empty_like(state_dict[prefix + "bank"])  # the bank's size comes from the checkpoint
        super()._load_from_state_dict(state_dict, prefix, *args)

    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.cdist(images.flatten(1), self.bank)
        nearest = self.bank[d.argmin(1)].view_as(images)
        amap = (images - nearest).abs().mean(1) / 16
        return d.min(1).values, amap


def stream(n: int, seed: int = 0, size: int = 8, step: float = 0.05) -> torch.Tensor:
    """A slowly drifting "camera": frame i and i+1 are near-copies, frames far apart differ."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, step, size=(n, 3, size, size)), axis=0)
    return torch.from_numpy(np.clip(0.5 + walk, 0, 1).astype(np.float32))


def test_final_model_learns_from_every_image_and_folds_from_the_others() -> None:
    model = NearestImage().fit(stream(40).split(8), progress=False, folds=4)
    assert model.fit_sizes[0] == 40  # the final model: every image
    assert model.bank.shape[0] == 40


def test_normaliser_comes_from_images_the_model_did_not_see() -> None:
    frames = stream(60)
    model = NearestImage().fit(frames[:50].split(10), progress=False, folds=5)
    # A memory bank scores its own images 0; held-out statistics must not be that low.
    assert float(model.normalizer.threshold) > 0.1
    # The next frames of the stream are normal: the [0, 1] score keeps them below the alert threshold.
    later = model(frames[50:]).score
    assert float((later < 0.5).float().mean()) >= 0.8


def test_folds_are_contiguous_blocks_or_whole_videos() -> None:
    assert fold_assignment(10, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert fold_assignment(3, 5).tolist() == [0, 0, 0]  # too few for two items per fold: one block
    videos = torch.tensor([7, 7, 7, 3, 3, 9, 9, 9])
    assert fold_assignment(8, 5, videos).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # one fold per video
    assert fold_assignment(8, 2, videos).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_video_ids_in_batches_fold_by_video() -> None:
    frames = stream(30)
    batches = [{"image": frames[i : i + 10], "video": torch.full((10,), i // 10)} for i in range(0, 30, 10)]
    model = NearestImage().fit(batches, progress=False, folds=5)
    assert model.fit_sizes[0] == 30
    assert float(model.normalizer.threshold) > 0.1


def test_interleaved_validation_normalises_too_low() -> None:
    """Why contiguous folds: every k-th frame has a near-copy in training, so its score is near 0."""
    frames = stream(50)
    val = torch.arange(50) % 5 == 0
    interleaved = NearestImage().fit(frames[~val].split(10), frames[val].split(10), progress=False)
    held_out = NearestImage().fit(frames.split(10), progress=False, folds=5)
    assert float(held_out.normalizer.threshold) > 1.5 * float(interleaved.normalizer.threshold)


def test_one_shot_iterator_without_validation_is_refused() -> None:
    with pytest.raises(FitError, match="re-iterable train_loader"):
        NearestImage().fit(iter(stream(10).split(5)), progress=False)


def test_logits_do_not_saturate() -> None:
    model = NearestImage().fit(stream(40, step=0.002).split(10), progress=False)
    far = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])  # two very different, clear anomalies
    score = model(far).score
    logits, maps = model.logits(far)
    assert logits.dtype == torch.float64 and maps is not None and maps.dtype == torch.float64
    assert torch.all(score == 1.0)  # the [0, 1] score ties them at 1.0 ...
    assert logits[0] != logits[1] and torch.all(logits > 0)  # ... the logit still ranks them
    assert torch.allclose(torch.sigmoid(logits.float()), score)


def test_maps_have_their_own_normaliser() -> None:
    """A map cell is ~1/16 of the image score here (as in DFM): on the score's statistics every map is ~0."""
    frames = stream(50)
    model = NearestImage().fit(frames[:40].split(10), progress=False)
    defect = frames[45:46].clone()
    defect[..., 2:6, 2:6] = 1.0
    pred = model(defect)
    assert pred.score[0] > 0.5
    assert float(pred.anomaly_map[0, 2:6, 2:6].mean()) > 0.5  # the defect is hot on the map
    assert float(model(frames[40:44]).anomaly_map.amax(dim=(1, 2)).mean()) < 0.5  # normal frames stay cool
    assert float(model.map_normalizer.threshold) < float(model.normalizer.threshold) / 4


def test_checkpoint_without_a_map_normaliser_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oddeye.models import registry
    from oddeye.models.base import load_model

    monkeypatch.setitem(registry._REGISTRY, "nearest_image_test", NearestImage)
    monkeypatch.setattr(NearestImage, "name", "nearest_image_test")
    model = NearestImage().fit(stream(20).split(10), progress=False)
    path = model.save(tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["map_normalizer.threshold"], ckpt["state_dict"]["map_normalizer.scale"]
    torch.save(ckpt, path)
    loaded = load_model(path)
    assert float(loaded.map_normalizer.threshold) == float(model.normalizer.threshold)


def test_too_few_images_for_the_parameters_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="oddeye.models.base"):
        NearestImage(n_features=30).fit(stream(12).split(6), progress=False)
    assert "fitted on 12 image(s), fewer than the 31" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oddeye.models.base"):
        NearestImage(n_features=4).fit(stream(12).split(6), progress=False)
    assert "fewer than" not in caplog.text


def _cfg(tmp_path: Path, **fit: object) -> OddeyeConfig:
    return OddeyeConfig.model_validate(
        {
            "sources": [{"type": "images", "path": str(tmp_path)}],
            "fit": {"batch_size": 8, "val_fraction": 0.25, **fit},
            "model": {"name": "padim", "image_size": [32, 32], "device": "cpu", "checkpoint": str(tmp_path / "m.pt")},
        }
    )


def test_fit_images_learns_from_every_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[NearestImage] = []

    def create(name: str, **params: object) -> NearestImage:
        made.append(NearestImage(image_size=params["image_size"]))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(fit_module, "create_model", create)
    monkeypatch.setattr(NearestImage, "save", lambda self, path: Path(path))
    images = (stream(48, size=32).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    model, path = fit_module.fit_images(_cfg(tmp_path), images)
    assert path == tmp_path / "m.pt"
    assert model.fit_sizes[0] == 48  # every frame, none held back
    assert float(model.normalizer.threshold) > 0.1  # from 4 held-out contiguous folds


def test_single_category_keeps_the_checkpoint_path() -> None:
    assert fit_module.category_checkpoint("out/X.pt", "brick", several=False) == Path("out/X.pt")
    assert fit_module.category_checkpoint("out/X.pt", "brick") == Path("out/X-brick.pt")
    assert fit_module.category_checkpoint("out/{category}.pt", "brick", several=False) == Path("out/brick.pt")
