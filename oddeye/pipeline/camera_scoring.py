"""The model stage with ``model.scope: camera``: one backbone pass per batch, each camera's own head.

``CameraHeadsWorker`` scores a batch mixing cameras with the heads of a model directory
(``oddeye.models.camera_heads``). A camera with no head yet follows ``model.on_missing``:

- ``skip``: its frames are reported skipped, reason ``no_model`` (counted as dropped, acknowledged);
- ``default``: they are scored by the fallback model (``model.default``);
- ``fit``: its first ``fit.max_frames`` frames (every ``fit.stride``-th) are kept and reported
  skipped, reason ``fitting``; a head is then fitted on a background thread (other cameras go on
  scoring), written to the directory as a new version, and the camera scores from then on.

  With ``fit.max_seconds`` the fit also starts once the camera's stream has run that long (its
  first N minutes or frames, whichever comes first).

Every ``model.refresh_s`` the worker looks for newer versions of its heads (``oddeye fit --camera``,
or another replica's fit) and swaps them in; swaps are logged and counted.

With ``refit.every``, each head is refitted on that schedule from an even sample of the frames it
scored normal (below the lowest alert threshold) since the last refit. A guard holds back
``refit.val_fraction`` of them: a new head that alerts on more of those frames than the current
head does (beyond ``refit.max_alert_rate_increase``) is rejected and the current head stays.
Accepted and rejected refits are logged and counted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oddeye.config import ConfigError, ModelConfig, OddeyeConfig, RefitConfig
from oddeye.frames import Frame, Prediction
from oddeye.models.base import AnomalyModel, CheckpointError, load_model
from oddeye.models.camera_heads import CameraHeads, LoadedHead
from oddeye.pipeline.scoring import BatchResult, ModelWorker, prepare_model

__all__ = ["CameraHeadsWorker"]

log = logging.getLogger(__name__)

# Scores the images [n, 3, H, W] of some frames of a batch (their indices): the prediction and head versions.
_Scorer = Callable[[torch.Tensor, list[int]], tuple[Prediction, list[int]]]


@dataclass
class _Rows:
    """A batch's results laid out by frame index; frames not scored keep NaN."""

    n: int
    want_maps: str
    scores: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.full(self.n, np.nan, np.float32)
        self.labels = np.zeros(self.n, bool)


class _Sample:
    """An even random sample (reservoir) of at most ``size`` frames from a stream of any length, in arrival order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.frames: list[tuple[int, np.ndarray]] = []  # (arrival number, frame) per slot
        self._rng = np.random.default_rng(seed)

    def offer(self, image: np.ndarray) -> None:
        self.seen += 1
        j = len(self.frames) if len(self.frames) < self.size else int(self._rng.integers(self.seen))
        if j < self.size:  # fills a free slot, or replaces a random one: every frame is kept with probability size/seen
            kept = (self.seen, np.array(image, copy=True))
            self.frames[j : j + 1] = [kept]

    def images(self) -> np.ndarray:
        return np.stack([frame for _, frame in sorted(self.frames, key=lambda kept: kept[0])])


class CameraHeadsWorker(ModelWorker):
    """Scores batches with per-camera heads on one shared backbone (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        default_checkpoint: bytes | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        map_threshold: float = 0.0,
        labels_alert: bool = False,
        fit_max_frames: int = 200,
        fit_stride: int = 1,
        fit_batch_size: int = 16,
        fit_folds: int = 5,
        precision: str = "auto",
        compile: bool = False,
        fit_max_seconds: float | None = None,
        refit: RefitConfig | None = None,
        backend: str = "torch",
        batch_size: int = 8,
    ) -> None:
        """``precision`` and ``compile`` as for ``ModelWorker``: they apply to the shared backbone (and the
        default model); the heads score in float32 on the backbone's float32 features, as before.
        ``fit_max_seconds``: ``fit.max_seconds``; ``refit``: the scheduled refits (``refit.every``).
        ``backend: onnxruntime`` (CPU) runs the shared backbone with ONNX Runtime in graphs of ``batch_size``
        frames, the heads in torch; torch (with a warning) where it cannot."""
        self._setup(device, num_threads, map_threshold, labels_alert)
        self.config = model
        self.on_missing = model.on_missing or "skip"
        self.heads = CameraHeads.open(
            model.directory,
            model.name,
            model.params,
            model.image_size,
            self.device,
            model.head_dtype,
            model.max_head_bytes,
        )
        self.model = self.heads.template
        # The backbone every head shares (heads are copies of the template holding this very module): one
        # preparation speeds up every camera's feature pass, the fits of on_missing: fit included.
        self.inference = prepare_model(self.model, self.device, precision, compile)
        if backend == "onnxruntime":
            self._onnxruntime_backbone(batch_size)
        elif backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        self.default: AnomalyModel | None = None
        if default_checkpoint is not None:
            self.default = load_model(default_checkpoint).to(self.device).eval()
            if self.default.image_size != self.heads.image_size or self.default.is_video:
                raise CheckpointError(
                    f"model.default is {self.default.name} for {self.default.image_size} images; the heads take "
                    f"{self.heads.image_size}: fit the default model with the same model.image_size"
                )
            self.inference["default"] = prepare_model(self.default, self.device, precision, compile)
        self.name = self.heads.name
        self.image_size = self.heads.image_size
        self.clips = None
        self.fit_max_frames = int(fit_max_frames)
        self.fit_stride = max(1, int(fit_stride))
        self.fit_batch_size = int(fit_batch_size)
        self.fit_folds = int(fit_folds)
        self.fit_max_seconds = fit_max_seconds
        self.refit = refit if refit is not None and refit.every is not None else None
        self.swaps: dict[str, int] = {}
        self.refits: dict[str, dict[str, int]] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._buffer_seen: dict[str, int] = {}
        self._buffer_start: dict[str, float] = {}
        self._normal: dict[str, _Sample] = {}
        self._next_refit: dict[str, float] = {}
        self._refit_jobs: dict[str, Future[LoadedHead | None]] = {}
        self._fits: dict[str, Future[LoadedHead]] = {}
        self._fit_failed: dict[str, str] = {}
        self._fitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-fit")
        self._missing_until: dict[str, float] = {}
        self._next_refresh = time.monotonic() + model.refresh_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        log.info(
            "per-camera %s heads from %s on %s (on_missing: %s)",
            self.name,
            model.directory,
            self.device,
            self.on_missing,
        )

    def _onnxruntime_backbone(self, batch_size: int) -> None:
        """The heads' shared backbone through ONNX Runtime (CPU), or torch with a warning where it cannot run."""
        from oddeye.models.onnx_backend import OnnxRuntimeEmbedder

        embedder = self._try_onnxruntime(OnnxRuntimeEmbedder, batch_size, "the shared backbone runs")
        if embedder is not None:
            self.heads.embed = embedder

    def info(self) -> dict[str, Any]:
        return {**super().info(), "routes_by_camera": True, "scope": "camera", "directory": str(self.heads.directory)}

    # ------------------------------------------------------------------ heads
    def _head(self, key: str) -> LoadedHead | None:
        """The key's head, or None; a key found missing is looked up on disk again only every ``refresh_s``."""
        if time.monotonic() < self._missing_until.get(key, 0.0):
            return None
        try:
            head = self.heads.get(key)
        except CheckpointError as e:
            log.error("%s: head not loaded: %s", key, e)
            head = None
        if head is None:
            self._missing_until[key] = time.monotonic() + self.config.refresh_s
        else:
            self._missing_until.pop(key, None)
        return head

    def _refresh(self) -> None:
        """Hot swap: newer stored versions replace loaded heads; finished background fits are installed."""
        for key, fut in list(self._fits.items()):
            if not fut.done():
                continue
            del self._fits[key]
            try:
                loaded = fut.result()
            except Exception as e:  # a failed fit keeps its camera unscored and says why
                self._fit_failed[key] = f"{type(e).__name__}: {e}"
                log.error("%s: fitting a head failed: %s", key, self._fit_failed[key])
                continue
            self.heads.install(loaded)
            self._missing_until.pop(key, None)
            self._buffers.pop(key, None)
            log.info("%s: head v%d fitted from the stream; scoring starts", key, loaded.version)
        for key, job in list(self._refit_jobs.items()):
            if job.done():
                del self._refit_jobs[key]
                self._refit_done(key, job)
        if time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + self.config.refresh_s
        self._missing_until.clear()
        for key, old, new in self.heads.refresh():
            self.swaps[key] = self.swaps.get(key, 0) + 1
            log.warning("%s: hot swap of its head v%d → v%d", key, old, new)

    def _buffer_for_fit(self, key: str, image: np.ndarray, ts: float) -> None:
        """Keep a frame of a camera being learnt; start the background fit once enough are kept (or, with
        ``fit.max_seconds``, once its stream has run that long)."""
        if key in self._fits or key in self._fit_failed:
            return
        n = self._buffer_seen[key] = self._buffer_seen.get(key, 0) + 1
        start = self._buffer_start.setdefault(key, ts)
        frames = self._buffers.setdefault(key, [])
        if (n - 1) % self.fit_stride == 0 and len(frames) < self.fit_max_frames:
            frames.append(np.array(image, copy=True))
        timed_out = self.fit_max_seconds is not None and ts - start >= self.fit_max_seconds and len(frames) >= 2
        if len(frames) >= self.fit_max_frames or timed_out:
            images = np.stack(frames)
            why = f"{ts - start:.0f} s of its stream" if timed_out and len(frames) < self.fit_max_frames else "enough"
            log.info("%s: %d frames kept (%s); fitting its %s head in the background", key, len(images), why, self.name)
            self._fits[key] = self._fitter.submit(self._fit, key, images)

    def _fit(self, key: str, images: np.ndarray) -> LoadedHead:
        return self.heads.save_head(key, self._fit_head(images))

    def _fit_head(self, images: np.ndarray) -> AnomalyModel:
        """A new head fitted on frames [N, H, W, 3] (not saved), in batches of ``fit.batch_size``."""
        step = self.fit_batch_size
        batches = [self.images_to_tensor(images[i : i + step]) for i in range(0, len(images), step)]
        return self.heads.fit_head(batches, folds=self.fit_folds)

    def fit_progress(self, key: str, ts: float | None = None) -> float:
        """1 once the key has a head; else the share of its fit frames kept (or of ``fit.max_seconds``
        passed, at stream time ``ts``) so far, whichever is further."""
        if key in self.heads.loaded():
            return 1.0
        if self.on_missing != "fit":
            return 0.0
        share = len(self._buffers.get(key, ())) / self.fit_max_frames
        if self.fit_max_seconds is not None and ts is not None and key in self._buffer_start:
            share = max(share, (ts - self._buffer_start[key]) / self.fit_max_seconds)
        return min(1.0, share)

    # ------------------------------------------------------------------ scheduled refits
    def _keep_normal(self, key: str, image: np.ndarray) -> None:
        """A frame its head scored normal: into the key's sample for its next refit; the refit starts when due."""
        assert self.refit is not None
        now = time.monotonic()
        due = self._next_refit.setdefault(key, now + self.refit.every)  # type: ignore[operator]
        self._normal.setdefault(key, _Sample(self.refit.max_frames, seed=zlib.crc32(key.encode()))).offer(image)
        if now < due or key in self._refit_jobs or key in self._fits:
            return
        self._next_refit[key] = now + self.refit.every  # type: ignore[operator]
        sample = self._normal.pop(key)
        if len(sample.frames) < self.refit.min_frames:
            log.info(
                "%s: scheduled refit skipped: %d frames scored normal since the last one (refit.min_frames %d)",
                key,
                len(sample.frames),
                self.refit.min_frames,
            )
            self._count_refit(key, "skipped")
            return
        current = self.heads.get(key)
        if current is None:
            return
        log.info("%s: scheduled refit of head v%d on %d normal frames", key, current.version, len(sample.frames))
        self._refit_jobs[key] = self._fitter.submit(self._guarded_refit, key, sample.images(), current.model)

    def _guarded_refit(self, key: str, images: np.ndarray, current: AnomalyModel) -> LoadedHead | None:
        """Fit a new head on most of ``images`` (frames scored normal) and keep it only if it alerts on the
        held-back rest no more often than ``current`` does; returns the saved head, or None if rejected."""
        assert self.refit is not None
        n_val = max(1, round(len(images) * self.refit.val_fraction))
        order = np.random.default_rng(zlib.crc32(key.encode()) + len(images)).permutation(len(images))
        # Both halves stay in arrival order: the fit's held-out normalisation folds contiguous blocks.
        train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
        return self._guarded_refit_split(key, images[train], images[val], current)

    def _guarded_refit_split(
        self, key: str, train: np.ndarray, val: np.ndarray, current: AnomalyModel
    ) -> LoadedHead | None:
        """``_guarded_refit`` with its frames already split into ``train`` and the guard's ``val``."""
        assert self.refit is not None
        candidate = self._fit_head(train)
        x = self.images_to_tensor(val)
        rates = [self._alert_rate(model, x) for model in (current, candidate)]
        if rates[1] > rates[0] + self.refit.max_alert_rate_increase:
            log.warning(
                "%s: refit rejected: the new head alerts on %.0f%% of %d held-back normal frames, the current on "
                "%.0f%% (refit.max_alert_rate_increase %.2f); the current head stays",
                key,
                100 * rates[1],
                len(val),
                100 * rates[0],
                self.refit.max_alert_rate_increase,
            )
            return None
        return self.heads.save_head(key, candidate)

    @torch.inference_mode()
    def _alert_rate(self, model: AnomalyModel, x: torch.Tensor) -> float:
        """Share of ``x``'s frames that would alert: at or above the lowest alert threshold (or, with
        ``threshold: auto``, labelled anomalous by the model)."""
        pred = model(x)
        label = pred.label.bool() if pred.label is not None else torch.zeros_like(pred.score, dtype=torch.bool)
        return float(self.alerting(pred.score.float(), label).float().mean())

    def _refit_done(self, key: str, job: Future[LoadedHead | None]) -> None:
        try:
            loaded = job.result()
        except Exception as e:  # a failed refit keeps the current head
            log.error("%s: scheduled refit failed (%s: %s); the current head stays", key, type(e).__name__, e)
            self._count_refit(key, "failed")
            return
        if loaded is None:
            self._count_refit(key, "rejected")
            return
        old = self.heads.get(key)
        self.heads.install(loaded)
        self.swaps[key] = self.swaps.get(key, 0) + 1
        self._count_refit(key, "accepted")
        log.warning(
            "%s: refit accepted: hot swap of its head v%d → v%d", key, old.version if old else 0, loaded.version
        )

    def _count_refit(self, key: str, result: str) -> None:
        counts = self.refits.setdefault(key, {})
        counts[result] = counts.get(result, 0) + 1

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(
        self, frames: list[Frame], images: np.ndarray | list[np.ndarray] | None = None, want_maps: str = "alerting"
    ) -> BatchResult:
        """Score a batch mixing cameras: one backbone pass for the frames whose cameras have heads."""
        t0 = time.perf_counter()
        if images is None:
            images = [f.image for f in frames]
        self._refresh()
        skipped: dict[int, str] = {}
        by_head: list[int] = []
        keys: list[str] = []
        fallback: list[int] = []
        status: dict[str, dict[str, float]] = {}
        for i, f in enumerate(frames):
            try:
                key = self.config.head_key(f.camera_id)
            except ConfigError as e:
                skipped[i] = "ambiguous_group"
                log.error("%s", e)
                continue
            head = self._head(key)
            status[f.camera_id] = {
                "version": float(head.version if head else 0),
                "fitted_at": head.fitted_at if head else 0.0,
                "fit_progress": 1.0 if head else self.fit_progress(key, f.timestamp),
            }
            if head is not None:
                by_head.append(i)
                keys.append(key)
            elif self.on_missing == "default" and self.default is not None:
                fallback.append(i)
            elif self.on_missing == "fit" and key not in self._fit_failed:
                self._buffer_for_fit(key, images[i], f.timestamp)
                status[f.camera_id]["fit_progress"] = self.fit_progress(key, f.timestamp)
                skipped[i] = "fitting"
            else:
                skipped[i] = "no_model"
        out = _Rows(len(frames), want_maps)
        if by_head:
            head_keys = dict(zip(by_head, keys, strict=True))
            self._score_rows(by_head, lambda x, r: self.heads.predict(x, [head_keys[j] for j in r]), images, out)
            if self.refit is not None:
                for i in by_head:
                    if np.isfinite(out.scores[i]) and not self.alerting(out.scores[i], out.labels[i]):
                        self._keep_normal(head_keys[i], images[i])
        if fallback:
            self._score_rows(fallback, self._score_default, images, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return BatchResult(
            out.scores,
            out.maps if out.maps or by_head or fallback else None,
            None,
            time.perf_counter() - t0,
            self.name,
            None,
            skipped,
            labels=out.labels,
            failed=out.failed,
            model_versions=out.versions,
            camera_models=status,
            swaps=dict(self.swaps),
            refits={key: dict(counts) for key, counts in self.refits.items()},
            head_bytes=self.heads.head_bytes,
            worker=self.worker_id,
        )

    def _score_default(self, x: torch.Tensor, rows: list[int]) -> tuple[Prediction, list[int]]:
        assert self.default is not None
        return self.default(x), [0] * len(rows)

    def _score_rows(self, rows: list[int], run: _Scorer, images: np.ndarray | list[np.ndarray], out: _Rows) -> None:
        """Score ``rows`` together; if that fails, one by one, so only the frames that fail are dead letters."""
        try:
            pred, used = run(self.images_to_tensor([images[j] for j in rows]), rows)
            got = pred.score.float().cpu().numpy()
            if not np.all(np.isfinite(got)):
                raise FloatingPointError("model returned non-finite scores")
        except Exception as e:
            if len(rows) == 1:
                self.log_failure("a frame", e)
                out.failed[rows[0]] = f"{type(e).__name__}: {e}"
                return
            log.warning("model %s failed on %d frames (%s); scoring them one by one", self.name, len(rows), e)
            for j in rows:
                self._score_rows([j], run, images, out)
            return
        out.scores[rows] = got
        if pred.label is not None:
            out.labels[rows] = pred.label.cpu().numpy().astype(bool)
        out.maps.update(self.select_maps(pred.anomaly_map, rows, out.scores, out.labels, out.want_maps) or {})
        out.versions.update(zip(rows, used, strict=True))

    def close(self) -> None:
        """Stop the background fitter (a fit under way finishes first)."""
        self._fitter.shutdown(wait=True)


def open_model_directory(cfg: OddeyeConfig) -> CameraHeads:
    """Open ``model.directory`` for the config's model, creating it (backbone files) when new.

    The driver calls this before any replica starts, so that replicas never race to create the
    backbone (with random or freshly downloaded weights, two creations could differ).
    """
    m = cfg.model
    return CameraHeads.open(m.directory, m.name, m.params, m.image_size, "cpu", m.head_dtype)


def camera_actor_kwargs(cfg: OddeyeConfig) -> dict[str, Any]:
    """The ``CameraHeadsWorker`` arguments that come from the config (beside device, threads and maps)."""
    from oddeye.pipeline.fit import holdout_folds

    return {
        "model": cfg.model,
        "fit_max_frames": cfg.fit.max_frames,
        "fit_stride": cfg.fit.stride,
        "fit_batch_size": cfg.fit.batch_size,
        "fit_folds": holdout_folds(cfg),
        "precision": cfg.model.precision,
        "compile": cfg.model.compile,
        "fit_max_seconds": cfg.fit.max_seconds,
        "refit": cfg.refit,
        "backend": cfg.model.backend,
        "batch_size": cfg.batching.max_batch_size,
    }
