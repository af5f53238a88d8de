"""``null``: a no-op model for benchmarks and fault injection — it detects nothing.

It scores every frame the same low value and fits instantly, so a pipeline run with it
measures oddeye's own overhead (decode, transport, batching, results) against the decode
limit (``benchmarks/pipeline_ceiling.py``). With ``fail_marker: true`` it raises on frames
carrying a marker (a magenta top-left block), which is how the fault-injection benchmark
(``benchmarks/chaos.py``) and the tests make a model fail on chosen frames; with
``marker_action: exit`` it ends its own process instead, as a crashing model (a segfault in a
native library, an out-of-memory kill) would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import numpy as np
import torch

from oddeye.models.base import AnomalyModel
from oddeye.models.registry import register

__all__ = ["MARKER_COLOUR", "NullModel", "add_fail_marker"]

MARKER_COLOUR = (255, 0, 255)
MARKER_FRACTION = 8  # the marker is the top-left (H/8 × W/8) block, so it survives resizing and JPEG


class MarkedFrameError(ValueError):
    """Raised by ``null`` with ``fail_marker`` on a marked frame (fault injection)."""


def add_fail_marker(image: np.ndarray) -> np.ndarray:
    """Paint the marker on an H×W×3 uint8 RGB image (a copy) so that ``null(fail_marker=True)`` raises on it."""
    out = image.copy()
    h, w = out.shape[:2]
    out[: max(4, h // MARKER_FRACTION), : max(4, w // MARKER_FRACTION)] = MARKER_COLOUR
    return out


@register("null")
class NullModel(AnomalyModel):
    """A no-op benchmark model: scores every frame alike and detects nothing (benchmarks and fault injection)."""

    def __init__(
        self,
        image_size: tuple[int, int] | list[int] = (256, 256),
        fail_marker: bool = False,
        latency_ms: float = 0.0,
        marker_action: str = "raise",
    ) -> None:
        """``latency_ms``: simulated inference time per batch, so a benchmark can set the model's capacity.

        ``marker_action``: what a marked frame does with ``fail_marker``: ``raise`` an error (a model
        error: the frame is dead-lettered) or ``exit`` the process at once (a crash: the replica dies).
        """
        super().__init__(image_size=image_size)
        if marker_action not in ("raise", "exit"):
            raise ValueError(f"marker_action must be 'raise' or 'exit', got {marker_action!r}")
        self.marker_action = marker_action
        self.fail_marker = bool(fail_marker)
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be ≥ 0, got {latency_ms}")
        self.latency_ms = float(latency_ms)

    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        for _ in batches:
            pass

    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.fail_marker:
            h, w = images.shape[-2:]
            block = images[:, :, : max(2, h // (2 * MARKER_FRACTION)), : max(2, w // (2 * MARKER_FRACTION))]
            mean = block.float().mean(dim=(2, 3))
            marked = (mean[:, 0] > 0.8) & (mean[:, 1] < 0.2) & (mean[:, 2] > 0.8)
            if bool(marked.any()):
                if self.marker_action == "exit":
                    os._exit(3)  # no clean-up, like a crash
                raise MarkedFrameError(f"null: marked frame(s) at batch index {marked.nonzero().flatten().tolist()}")
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000.0)
        return torch.zeros(images.shape[0], device=images.device), None
