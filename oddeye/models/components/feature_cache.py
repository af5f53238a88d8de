"""Frozen-backbone features of the training batches, computed once per fit instead of once per epoch.

A gradient-trained model whose backbone is frozen (eval mode, no gradients) feeds the same
training images through the same backbone every epoch and gets the same features back: on a
CPU that forward is a large part of each training step. ``FrozenFeatureCache`` keys a training
batch by a cheap fingerprint of its pixels and keeps whatever the model computed from it (a
tensor, or a tuple/list/dict of tensors), so every later epoch finds the features instead of
recomputing them. The trainer iterates the same re-iterable loader every epoch, so a loader
that yields its batches in a fixed order hits from the second epoch on.

Use it only where the cached value is a pure function of the batch:

- the backbone is frozen (``requires_grad=False``; batch norms in eval mode). The features are
  computed under ``no_grad`` and stored detached, so a backbone that trains would silently stop
  learning; never use it for those.
- the images entering the backbone are the plain training images, with no per-epoch randomness
  (augmentation, random crops or noise before the backbone). Randomness applied to the features
  afterwards is fine, as long as it never modifies the cached tensors in place (``clone`` first).

A shuffling loader gives new batches every epoch: nothing hits, and entries accumulate up to the
byte budget. Beyond ``max_bytes`` batches are computed and returned without being stored. Values
stay on the device they were computed on. Models reach it through
``TrainedAnomalyModel.frozen_features``; the ``Trainer`` clears it before and after each fit
(also a failed one), so that no features outlive the fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["DEFAULT_CACHE_BYTES", "FrozenFeatureCache", "batch_fingerprint"]

DEFAULT_CACHE_BYTES = 2 << 30
"""2 GiB of stored features per fit, on the device they were computed on."""

T = TypeVar("T")


class FrozenFeatureCache:
    """``get(batch, compute)`` → ``compute(batch)``, computed once per distinct batch while ``max_bytes`` allows."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._store: dict[tuple[Any, ...], Any] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(self, images: torch.Tensor, compute: Callable[[torch.Tensor], T]) -> T:
        """The features of ``images``: stored ones if this batch was seen, else ``compute(images)`` (no_grad, detached).

        A new result is stored if it fits in what is left of ``max_bytes``; otherwise it is only returned.
        """
        key = batch_fingerprint(images)
        if key in self._store:
            self.hits += 1
            return self._store[key]
        self.misses += 1
        with torch.no_grad():
            value = _detached(compute(images))
        size = _nbytes(value)
        if self.nbytes + size <= self.max_bytes:
            self._store[key] = value
            self.nbytes += size
        return value

    def clear(self) -> None:
        """Forget every stored batch (and the hit/miss counts)."""
        self._store = {}
        self.nbytes = self.hits = self.misses = 0


def batch_fingerprint(images: torch.Tensor) -> tuple[Any, ...]:
    """A cheap key that tells training batches apart: shape, dtype, device and a few sums of the pixels."""
    flat = images.detach().flatten(1).float()
    probe = flat[:, :: max(1, flat.shape[1] // 4099)].sum(1)
    return (
        tuple(images.shape),
        images.dtype,
        str(images.device),
        float(flat.sum()),
        *(round(float(v), 4) for v in probe),
    )


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
