"""The model stage: one loaded model on one device, scoring batches of frames.

``ModelWorker`` is plain Python; ``oddeye.pipeline.actors`` hosts it as a Ray actor
(one per replica). Frames travel as uint8 (4× smaller than float), are stacked, moved
to the device (through pinned memory on CUDA) and normalised there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oddeye.frames import Frame
from oddeye.models.base import load_model

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {device!r} but no CUDA device is available; use device: auto or cpu")
    return dev


@dataclass
class BatchResult:
    """Scores for one batch, in the order of the frames sent."""

    scores: np.ndarray
    anomaly_maps: np.ndarray | None
    boxes: list[list[list[float]]] | None
    infer_s: float
    model: str
    error: str | None = None


class ModelWorker:
    def __init__(self, checkpoint: str | bytes, device: str = "auto", num_threads: int | None = None) -> None:
        """``checkpoint`` is a path or the checkpoint's bytes (how the driver ships it to any node)."""
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, map_location="cpu").to(self.device).eval()
        self.name = self.model.name
        self.image_size = self.model.image_size
        log.info("model %s loaded on %s", self.name, self.device)

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "image_size": list(self.image_size), "device": str(self.device)}

    def images_to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.float().div_(255.0)

    @torch.inference_mode()
    def score(self, frames: list[Frame]) -> BatchResult:
        t0 = time.perf_counter()
        try:
            pred = self.model(self.images_to_tensor([f.image for f in frames]))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            scores = pred.score.float().cpu().numpy()
            if not np.all(np.isfinite(scores)):
                raise FloatingPointError("model returned non-finite scores")
            maps = None
            if pred.anomaly_map is not None:
                maps = (pred.anomaly_map.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            boxes = None if pred.boxes is None else [b.float().cpu().tolist() for b in pred.boxes]
        except Exception as e:  # one bad batch must not stop the pipeline
            log.exception("model %s failed on a batch of %d", self.name, len(frames))
            return BatchResult(
                np.zeros(0, np.float32), None, None, time.perf_counter() - t0, self.name, f"{type(e).__name__}: {e}"
            )
        return BatchResult(scores, maps, boxes, time.perf_counter() - t0, self.name)
