"""The model stage: one loaded model on one device, scoring batches of frames.

``ModelWorker`` is plain Python; ``oddeye.pipeline.actors`` hosts it as a Ray actor
(one per replica). Frames travel as uint8 (4× smaller than float), are stacked, moved
to the device (through pinned memory on CUDA) and normalised there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oddeye.frames import Frame
from oddeye.models.base import load_model
from oddeye.pipeline.clips import ClipBuffers

log = logging.getLogger(__name__)

_TRACEBACK_EVERY_S = 600.0  # a model error's traceback is logged again after this long


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
    anomaly_maps: dict[int, np.ndarray] | None
    """uint8 maps (0–255 for scores 0–1) by frame index, only for the frames that asked for one:
    every frame with ``want_maps="all"``, those scoring at or above ``map_threshold`` otherwise."""
    boxes: list[list[list[float]]] | None
    infer_s: float
    model: str
    error: str | None = None
    skipped: dict[int, str] = field(default_factory=dict)
    """Frames (by index) that were not scored, with the reason (a video model's clip still filling)."""
    clip_resets: dict[str, int] = field(default_factory=dict)
    """Cumulative per-camera clip buffer resets of this replica, by reason (gap, reorder, resolution)."""
    labels: np.ndarray | None = None
    """The model's own per-frame decision (e.g. U-Flow's NFA test), for ``alerts.threshold: auto``."""
    failed: dict[int, str] = field(default_factory=dict)
    """Frames (by index) the model failed on, with the error: they go to the dead-letter path while
    the rest of the batch is scored (a failing batch is retried frame by frame to find them)."""
    model_versions: dict[int, int] = field(default_factory=dict)
    """scope camera: the version of the head that scored each frame (by index; 0: the default model)."""
    camera_models: dict[str, dict[str, float]] = field(default_factory=dict)
    """scope camera: per camera of the batch, its head's ``version``, ``fitted_at`` and ``fit_progress``."""
    swaps: dict[str, int] = field(default_factory=dict)
    """scope camera: cumulative hot swaps of this replica's heads, by camera (or group)."""
    refits: dict[str, dict[str, int]] = field(default_factory=dict)
    """scope camera: cumulative scheduled refits by camera (or group) and result (accepted, rejected, ...)."""
    head_bytes: int | None = None
    """scope camera: bytes of the heads this replica holds in memory."""
    worker: str = ""
    """Which replica answered (host:pid), for per-replica gauges such as ``head_bytes``."""


def configure_threads(num_threads: int | None) -> int:
    """Size torch's and OpenCV's thread pools to the CPUs this worker was granted, not the machine's.

    Every actor sizing its pools to every core oversubscribes a busy machine (and OpenMP threads
    spinning while they wait make it worse: the actors' environment sets OMP_WAIT_POLICY=PASSIVE).
    """
    n = max(1, int(num_threads or os.cpu_count() or 1))
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # OpenCV is optional for scoring
        pass
    return n


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str, compile: bool) -> dict[str, Any]:
    """``prepare_for_inference`` (channels_last, batch-norm folding, the backbone's precision, compile)
    wherever each wins on ``device``: the settings applied, or {} (with a warning) if that failed."""
    try:
        from oddeye.models.inference import inference_settings, prepare_for_inference

        prepare_for_inference(model, device, precision=precision, compile=compile)
        return dict(inference_settings(model) or {})
    except Exception as e:  # a speed-up must never stop scoring
        name = getattr(model, "name", type(model).__name__)
        log.warning("model %s: inference speed-ups not applied (%s); scoring as loaded", name, e)
        return {}


class ModelWorker:
    def __init__(
        self,
        checkpoint: str | bytes,
        device: str = "auto",
        num_threads: int | None = None,
        map_threshold: float = 0.0,
        labels_alert: bool = False,
        backend: str = "torch",
        batch_size: int = 8,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        """``checkpoint`` is a path or the checkpoint's bytes (how the driver ships it to any node).

        ``backend``: ``torch``, or ``onnxruntime`` (CPU; image models): the checkpoint is exported to
        ONNX on load and scored by ONNX Runtime in graphs of ``batch_size`` frames; torch if that fails.

        ``map_threshold``: anomaly maps go back only for frames scoring at or above it (the lowest
        alert threshold: frames that can open or update an alert), unless a call asks for all;
        ``labels_alert``: also for frames the model itself labels anomalous (``threshold: auto``).
        """
        self._setup(device, num_threads, map_threshold, labels_alert)
        self.model = load_model(checkpoint, map_location="cpu").to(self.device).eval()
        self.inference = prepare_model(self.model, self.device, precision, compile)
        self.scorer: Any = self.model
        if backend == "onnxruntime":
            self.scorer = self._onnxruntime(batch_size)
        elif backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        self.name = self.model.name
        self.image_size = self.model.image_size
        self.clips = ClipBuffers(self.model.clip_length) if self.model.is_video else None
        log.info("model %s loaded on %s", self.name, self.device)

    def _setup(self, device: str, num_threads: int | None, map_threshold: float, labels_alert: bool) -> None:
        """What every model worker sets first: its thread pools, its device and which maps go back."""
        self.num_threads = configure_threads(num_threads)
        self.map_threshold = float(map_threshold)
        self.labels_alert = bool(labels_alert)
        self.device = resolve_device(device)
        self._failures: dict[str, int] = {}
        self._traced_at: dict[str, float] = {}

    def log_failure(self, what: str, e: BaseException) -> None:
        """A model failure: logged with its traceback the first time its error type is seen (and every
        ``_TRACEBACK_EVERY_S``), else as one line with a count, so a stream of bad frames cannot flood the log."""
        kind = type(e).__name__
        n = self._failures[kind] = self._failures.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._traced_at.get(kind, -_TRACEBACK_EVERY_S) >= _TRACEBACK_EVERY_S:
            self._traced_at[kind] = now
            log.error("model %s failed on %s (%s #%d)", self.name, what, kind, n, exc_info=e)
        else:
            log.error("model %s failed on %s: %s: %s (#%d; traceback logged earlier)", self.name, what, kind, e, n)

    def _onnxruntime(self, batch_size: int) -> Any:
        """The ONNX Runtime scorer of the loaded model, or the torch model (with a warning) where it cannot run."""
        from oddeye.models.onnx_backend import OnnxRuntimeModel

        return self._try_onnxruntime(OnnxRuntimeModel, batch_size, "scoring") or self.model

    def _try_onnxruntime(self, build: Callable[..., Any], batch_size: int, what: str) -> Any | None:
        """``build(self.model, batch_size=, num_threads=)``, an ONNX Runtime runner of the loaded model (or of its
        backbone), recorded in ``inference``; None, with a warning that torch goes on ``what``, where it cannot
        run (not on the CPU, a missing package, an unexportable model)."""
        if self.device.type != "cpu":
            log.warning("model %s: the onnxruntime backend runs on the CPU only; %s with torch", self.model.name, what)
            return None
        try:
            runner = build(self.model, batch_size=batch_size, num_threads=self.num_threads)
        except Exception as e:  # torch still scores
            log.warning("model %s: onnxruntime backend unavailable (%s); %s with torch", self.model.name, e, what)
            return None
        self.inference = {**self.inference, "backend": "onnxruntime", "backend_batch_size": batch_size}
        return runner

    def info(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "image_size": list(self.image_size),
            "device": str(self.device),
            "is_video": self.model.is_video,
            "num_threads": self.num_threads,
            "pid": os.getpid(),
            "inference": self.inference,
        }

    def images_to_tensor(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        stacked = images if isinstance(images, np.ndarray) else np.stack(images)
        batch = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.float().div_(255.0)

    def _inputs(
        self, frames: list[Frame], images: np.ndarray | list[np.ndarray]
    ) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
        """The model's input batch, the indices of the frames it scores, and the frames it skips."""
        if self.clips is None:
            return self.images_to_tensor(images), list(range(len(frames))), {}
        clips, index, skipped = [], [], {}
        for i, f in enumerate(frames):
            clip = self.clips.push(f.camera_id, f.seq, images[i])
            if clip is None:
                skipped[i] = "clip_warmup"
            else:
                clips.append(clip)
                index.append(i)
        if not clips:
            return None, index, skipped
        t = len(clips[0])
        batch = self.images_to_tensor([im for c in clips for im in c])
        return batch.unflatten(0, (len(clips), t)), index, skipped

    @torch.inference_mode()
    def score(
        self, frames: list[Frame], images: np.ndarray | list[np.ndarray] | None = None, want_maps: str = "alerting"
    ) -> BatchResult:
        """Score ``frames`` (their pixels in ``images`` [n, H, W, 3] uint8, or in each ``frame.image``).

        ``want_maps``: ``"alerting"`` returns maps for frames at or above ``map_threshold``,
        ``"all"`` for every frame, ``"none"`` for none.
        """
        t0 = time.perf_counter()
        resets = dict(self.clips.resets) if self.clips is not None else {}
        if images is None:
            images = [f.image for f in frames]
        try:
            inputs, index, skipped = self._inputs(frames, images)
            if inputs is None:
                return BatchResult(
                    np.full(len(frames), np.nan, np.float32), None, None, 0.0, self.name, None, skipped, resets
                )
            pred = self.scorer(inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            got = pred.score.float().cpu().numpy()
            if not np.all(np.isfinite(got)):
                raise FloatingPointError("model returned non-finite scores")
            # Results are laid out per input frame; skipped frames keep NaN and no map.
            scores = np.full(len(frames), np.nan, np.float32)
            scores[index] = got
            labels = np.zeros(len(frames), bool)
            if pred.label is not None:
                labels[index] = pred.label.cpu().numpy().astype(bool)
            maps = self.select_maps(pred.anomaly_map, index, scores, labels, want_maps)
            boxes = None
            if pred.boxes is not None:
                boxes = [[] for _ in frames]
                for j, b in zip(index, pred.boxes, strict=True):
                    boxes[j] = b.float().cpu().tolist()
        except Exception as e:  # one bad frame must not stop the pipeline, nor cost its batch
            if self.clips is None and len(frames) > 1:
                log.warning(
                    "model %s failed on a batch of %d (%s); scoring it frame by frame", self.name, len(frames), e
                )
                return self._one_by_one(frames, images, want_maps, t0)
            self.log_failure(f"a batch of {len(frames)}", e)
            return BatchResult(
                np.zeros(0, np.float32), None, None, time.perf_counter() - t0, self.name, f"{type(e).__name__}: {e}"
            )
        return BatchResult(
            scores, maps, boxes, time.perf_counter() - t0, self.name, None, skipped, resets, labels=labels
        )

    def alerting(self, score: Any, label: Any) -> Any:
        """Whether a frame (or, elementwise, frames) can open or keep an alert: at or above ``map_threshold``,
        or, with ``threshold: auto``, labelled anomalous by the model. Takes floats/bools or arrays/tensors."""
        over = score >= self.map_threshold
        return over | label if self.labels_alert else over

    def select_maps(
        self,
        anomaly_map: torch.Tensor | None,
        index: list[int],
        scores: np.ndarray,
        labels: np.ndarray,
        want_maps: str,
    ) -> dict[int, np.ndarray] | None:
        """uint8 maps by frame index for the rows (``index``: their frames) that ``want_maps`` asks for."""
        if anomaly_map is None or want_maps == "none":
            return None
        rows = [k for k, j in enumerate(index) if want_maps == "all" or self.alerting(scores[j], labels[j])]
        if not rows:
            return {}
        sel = anomaly_map[rows].clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        return {index[k]: sel[r] for r, k in enumerate(rows)}

    def _one_by_one(
        self, frames: list[Frame], images: np.ndarray | list[np.ndarray], want_maps: str, t0: float
    ) -> BatchResult:
        """Score each frame alone, so that only the frames the model fails on are dead letters."""
        scores = np.full(len(frames), np.nan, np.float32)
        labels = np.zeros(len(frames), bool)
        maps: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for i, f in enumerate(frames):
            one = self.score([f], images[i : i + 1], want_maps)
            if one.error is not None:
                failed[i] = one.error
                continue
            scores[i] = one.scores[0]
            labels[i] = bool(one.labels[0]) if one.labels is not None else False
            if one.anomaly_maps and 0 in one.anomaly_maps:
                maps[i] = one.anomaly_maps[0]
        return BatchResult(scores, maps, None, time.perf_counter() - t0, self.name, None, labels=labels, failed=failed)
