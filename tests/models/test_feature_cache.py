"""FrozenFeatureCache: one backbone forward per distinct training batch per fit, the same weights as without it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from oddeye.models.base import FitError
from oddeye.models.components import FrozenFeatureCache, batch_fingerprint
from oddeye.models.image.cflow import Cflow
from oddeye.models.image.csflow import Csflow
from oddeye.models.image.efficient_ad import EfficientAd
from oddeye.models.image.fastflow import Fastflow
from oddeye.models.image.general_ad import GeneralAD
from oddeye.models.image.glass import Glass
from oddeye.models.image.reverse_distillation import ReverseDistillation
from oddeye.models.image.stfpm import Stfpm
from oddeye.models.image.uflow import Uflow
from oddeye.models.training import TrainedAnomalyModel, Trainer
from tests.models.helpers import SIZE, defect_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

COMMON = {"pre_trained": False, "max_epochs": 3, "max_steps": None, "image_size": (SIZE, SIZE)}
# Tiny versions of every model that caches its frozen features (the style of each model's own tests).
TINY: dict[str, Callable[[], TrainedAnomalyModel]] = {
    "fastflow": lambda: Fastflow(layers=["layer1", "layer2"], flow_steps=2, hidden_ratio=0.5, **COMMON),
    "uflow": lambda: Uflow(
        layers=["layer1", "layer2", "layer3"], flow_steps=2, affine_subnet_channels_ratio=0.5, **COMMON
    ),
    "csflow": lambda: Csflow(
        backbone="resnet18", layer="layer2", cross_conv_hidden_channels=16, n_coupling_blocks=2, **COMMON
    ),
    "cflow": lambda: Cflow(
        layers=["layer1", "layer2"], fiber_batch_size=256, condition_vector=16, coupling_blocks=2, **COMMON
    ),
    "general_ad": lambda: GeneralAD(
        backbone="resnet18",
        layers=["layer2"],
        pre_trained=False,
        hidden_dim=32,
        epochs=3,
        num_fake_patches=5,
        fake_feature_type="random",
        image_size=(SIZE, SIZE),
    ),
    "stfpm": lambda: Stfpm(backbone="resnet18", layers=["layer1", "layer2"], **COMMON),
    "reverse_distillation": lambda: ReverseDistillation(backbone="resnet18", layers=["layer1", "layer2"], **COMMON),
    "efficient_ad": lambda: EfficientAd(
        teacher_out_channels=16, imagenet_dir=None, max_epochs=3, max_steps=None, image_size=(SIZE, SIZE)
    ),
    "glass": lambda: Glass(
        backbone="resnet18",
        layers=["layer1", "layer2"],
        pretrain_embed_dim=64,
        target_embed_dim=64,
        discriminator_hidden=64,
        step=2,
        **COMMON,
    ),
}
# The frozen network whose forwards are counted, where it is not ``feature_extractor``.
FROZEN = {"stfpm": "teacher", "reverse_distillation": "encoder", "efficient_ad": "teacher"}
# Backbone forwards per training batch: CS-Flow runs it on three input scales.
FORWARDS_PER_BATCH = {"csflow": 3}
# Passes over the training batches before the first step (EfficientAd's teacher statistics, GLASS's
# centre), whose features the steps reuse, and after the last one (CFLOW's largest likelihoods).
START_PASS = {"efficient_ad": 1, "glass": 1}
END_PASS = {"cflow": 1}
# EfficientAd's map quantiles rescan the training batches only when it has no held-out images (as here:
# ``Trainer.fit`` alone); that scoring pass recomputes the teacher, with or without the cache.
UNCACHED_END_PASS = {"efficient_ad": 1}
# The frozen network also sees images drawn anew every step (EfficientAd's augmented batch, GLASS's
# LAS images), which are never cached: only its forwards on the training images themselves count.
TRAINING_IMAGES_ONLY = {"efficient_ad", "glass"}


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return list(defect_data(n_train=24, n_val=2, n_test=2)["train"].split(8))


# -- the component
def test_hits_the_same_batch_and_misses_another() -> None:
    cache = FrozenFeatureCache()
    calls: list[torch.Tensor] = []

    def compute(x: torch.Tensor) -> dict[str, Any]:
        calls.append(x)
        return {"map": x * 2, "pair": (x.sum(1), None)}

    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    first = cache.get(a, compute)
    again = cache.get(a.clone(), compute)  # the same pixels in another tensor
    assert len(calls) == 1 and again is first
    cache.get(b, compute)
    assert len(calls) == 2 and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 2)
    assert cache.nbytes == 2 * (a.numel() + 2 * 8 * 8) * 4
    assert batch_fingerprint(a) != batch_fingerprint(b)
    assert batch_fingerprint(a) != batch_fingerprint(a[:1])  # shape is part of the key


def test_values_are_detached_and_computed_without_gradients() -> None:
    layer = torch.nn.Linear(4, 4)
    cache = FrozenFeatureCache()
    seen_grad_mode: list[bool] = []

    def compute(x: torch.Tensor) -> torch.Tensor:
        seen_grad_mode.append(torch.is_grad_enabled())
        return layer(x)

    out = cache.get(torch.rand(3, 4), compute)
    assert seen_grad_mode == [False] and not out.requires_grad and out.grad_fn is None


def test_byte_budget_stores_what_fits_and_computes_the_rest() -> None:
    one = 2 * 3 * 8 * 8 * 4  # a [2, 3, 8, 8] float32 batch's bytes
    cache = FrozenFeatureCache(max_bytes=one + 10)
    calls = []

    def compute(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x + 1

    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    cache.get(a, compute)
    out = cache.get(b, compute)  # computed, returned, not stored: it would pass the budget
    assert torch.equal(out, b + 1)
    assert len(cache) == 1 and cache.nbytes == one
    cache.get(b, compute)
    cache.get(a, compute)
    assert len(calls) == 3  # b again (never stored), a from the cache
    nothing = FrozenFeatureCache(max_bytes=0)
    nothing.get(a, compute)
    nothing.get(a, compute)
    assert len(nothing) == 0 and nothing.nbytes == 0 and len(calls) == 5
    with pytest.raises(ValueError, match="max_bytes"):
        FrozenFeatureCache(max_bytes=-1)


def test_clear_empties_it() -> None:
    cache = FrozenFeatureCache()
    x = torch.rand(2, 3, 8, 8)
    cache.get(x, lambda t: t * 3)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and (cache.hits, cache.misses) == (0, 0)
    calls = []
    cache.get(x, lambda t: calls.append(1) or t)
    assert calls == [1]


# -- the models that use it
def _count_forwards(
    model: TrainedAnomalyModel, name: str = "feature_extractor", only: list[torch.Tensor] | None = None
) -> list[int]:
    """Forwards of ``model.<name>`` ([counted, others]); with ``only``, just those on one of those batches."""
    count = [0, 0]
    network = getattr(model, name)
    forward = network.forward

    def counted(images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hit = only is None or any(images.shape == b.shape and torch.equal(images, b) for b in only)
        count[0 if hit else 1] += 1
        return forward(images, *args, **kwargs)

    network.forward = counted  # type: ignore[method-assign]
    return count


@pytest.mark.parametrize("name", list(TINY))
def test_a_fit_runs_the_backbone_once_per_batch(name: str, batches: list[torch.Tensor]) -> None:
    epochs = 3
    per_batch = FORWARDS_PER_BATCH.get(name, 1)
    only = batches if name in TRAINING_IMAGES_ONLY else None
    passes, others = {}, {}
    for cached in (True, False):
        model = TINY[name]()
        if not cached:
            model._feature_cache = FrozenFeatureCache(max_bytes=0)
        count = _count_forwards(model, FROZEN.get(name, "feature_extractor"), only)
        Trainer(max_epochs=epochs, seed=0, progress=False).fit(model, batches)
        passes[cached] = count[0] / (len(batches) * per_batch)
        others[cached] = count[1] / len(batches)
        assert len(model._feature_cache) == 0  # nothing outlives the fit
    end = UNCACHED_END_PASS.get(name, 0)
    assert passes == {True: 1 + end, False: START_PASS.get(name, 0) + epochs + END_PASS.get(name, 0) + end}
    # The per-step random images (augmented, synthesised) go through the frozen network every step either way.
    assert others == ({True: epochs, False: epochs} if only is not None else {True: 0, False: 0})


@pytest.mark.parametrize("name", list(TINY))
def test_the_cache_leaves_the_fit_unchanged(name: str, batches: list[torch.Tensor]) -> None:
    """Same seed, with and without the cache: the same weights and scores (float noise aside)."""
    fitted = []
    for budget in (None, 0):
        torch.manual_seed(0)
        model = TINY[name]()
        if budget is not None:
            model._feature_cache = FrozenFeatureCache(max_bytes=budget)
        Trainer(max_epochs=2, seed=0, progress=False).fit(model, batches)
        fitted.append(model)
    with_cache, without = fitted
    for a, b in zip(with_cache.state_dict().values(), without.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    probe = torch.cat([batches[0][:2], batches[-1][-2:]])
    score_a, map_a = with_cache.raw_forward(probe)[:2]
    score_b, map_b = without.raw_forward(probe)[:2]
    torch.testing.assert_close(score_a, score_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(map_a, map_b, rtol=1e-5, atol=1e-5)


def test_a_failed_fit_keeps_no_features(batches: list[torch.Tensor]) -> None:
    """The Trainer empties the cache even when a fit stops with an error (here a NaN loss)."""
    model = TINY["fastflow"]()
    step = model.training_step

    def nan_after_a_while(batch: torch.Tensor, i: int) -> torch.Tensor:
        loss = step(batch, i)
        return loss * float("nan") if i >= len(batches) else loss

    model.training_step = nan_after_a_while  # type: ignore[method-assign]
    with pytest.raises(FitError, match="became nan"):
        Trainer(max_epochs=3, seed=0, progress=False).fit(model, batches)
    assert model._feature_cache.misses == 0 and len(model._feature_cache) == 0
