"""Fitting a model from a config's ``fit`` section (in-process: fitting wants every core)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from oddeye.config import KafkaSourceConfig, OddeyeConfig, SyntheticSourceConfig
from oddeye.frames import DecodeError
from oddeye.models.base import AnomalyModel, FitError, create_model, get_model_class, model_params
from oddeye.models.camera_heads import CameraHeads, LoadedHead
from oddeye.pipeline.builders import build_source
from oddeye.pipeline.ingest import prepare_frame
from oddeye.pipeline.scoring import prepare_model, resolve_device
from oddeye.progress import progress_bar

log = logging.getLogger(__name__)


class TensorBatches:
    """Re-iterable batches [B, 3, H, W] (or clips [B, T, 3, H, W]) float in [0, 1] from uint8 [N, (T,) H, W, 3].

    With ``videos`` [N] (which video each item comes from) a batch is ``{"image": ..., "video": ...}``.
    """

    def __init__(
        self, images: np.ndarray, batch_size: int, device: torch.device, videos: np.ndarray | None = None
    ) -> None:
        if videos is not None and len(videos) != len(images):
            raise ValueError(f"videos names {len(videos)} items for {len(images)} images")
        self.images = images
        self.batch_size = batch_size
        self.device = device
        self.videos = videos

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            chunk = torch.from_numpy(self.images[i : i + self.batch_size]).movedim(-1, -3)
            images = chunk.to(self.device).float().div_(255.0)
            if self.videos is None:
                yield images
            else:
                yield {"image": images, "video": torch.as_tensor(self.videos[i : i + self.batch_size])}


def collect_fit_images(cfg: OddeyeConfig, progress: bool = True, clip_length: int = 1) -> np.ndarray:
    """Normal frames [N, H, W, 3] at the model's input size (clips [N, T, H, W, 3] when ``clip_length`` > 1).

    ``fit.max_frames`` counts training samples: frames for image models, clips for video
    models. With ``fit.stride`` k an image model keeps every k-th frame; a video model keeps
    a run of ``clip_length`` consecutive frames every k frames, so its clips span the scene
    and still hold real motion.
    """
    scfg = cfg.fit.source or cfg.sources[0]
    t, stride = clip_length, cfg.fit.stride
    run = t if stride > t else stride  # consecutive frames kept from each stride
    per_sample = stride * t / run if t > 1 else stride
    overrides = {}
    if isinstance(scfg, SyntheticSourceConfig):
        # Fit on the same scene with no injected anomalies, and never paced in real time.
        overrides = {"anomaly_every": 0, "realtime": False}
        if cfg.fit.source is None:
            overrides["num_frames"] = int(cfg.fit.max_frames * per_sample) + t
    source = build_source(scfg, **overrides)
    size = cfg.model.image_size
    samples: list[np.ndarray] = []
    window: list[tuple[int, np.ndarray]] = []  # the current run of consecutive frames (video)
    bad = 0
    try:
        bar = progress_bar(
            total=cfg.fit.max_frames, desc="reading fit frames", unit="clip" if t > 1 else "frame", disable=not progress
        )
        for i, frame in enumerate(source):
            if i % stride >= run or frame.meta.get("anomaly"):
                continue  # not sampled, or ground truth says anomalous: not for learning normality
            try:
                image = prepare_frame(frame, size).image
            except (DecodeError, ValueError) as e:
                bad += 1
                log.warning("fit: skipping frame %s/%s: %s", frame.camera_id, frame.seq, e)
                continue
            if t == 1:
                samples.append(image)  # type: ignore[arg-type]
            else:
                if window and frame.seq != window[-1][0] + 1:
                    window = []  # a gap: clips never span it
                window = [*window[-(t - 1) :], (frame.seq, image)]  # type: ignore[list-item]
                if len(window) < t:
                    continue
                samples.append(np.stack([im for _, im in window]))
            bar.update(1)
            if len(samples) >= cfg.fit.max_frames:
                break
        bar.close()
    finally:
        source.close()
    if bad:
        log.warning("fit: %d frame(s) could not be decoded and were skipped", bad)
    if len(samples) < 2:
        what = f"clips of {t} consecutive frames" if t > 1 else "frames"
        raise FitError(f"fit needs at least 2 normal {what}, the fit source gave {len(samples)}")
    return np.stack(samples)


def collect_camera_images(
    cfg: OddeyeConfig, cameras: Sequence[str] | None = None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Normal frames [N, H, W, 3] of each camera, split by ``camera_id``, up to ``fit.max_frames`` per camera.

    Read from ``fit.source`` or else every configured source (a synthetic one with its anomalies off).
    With ``cameras``, only the frames of those cameras' heads: a camera of a ``model.groups`` entry
    brings in every camera of its group. A source stops being read once every camera it has shown
    has its frames (or at its end).
    """
    wanted = None if cameras is None else {cfg.model.head_key(c) for c in cameras}
    sources = [cfg.fit.source] if cfg.fit.source is not None else list(cfg.sources)
    size, stride, limit = cfg.model.image_size, cfg.fit.stride, cfg.fit.max_frames
    frames: dict[str, list[np.ndarray]] = {}
    seen: dict[str, int] = {}
    bar = progress_bar(desc="reading fit frames", unit="frame", disable=not progress)
    for scfg in sources:
        fixed = getattr(scfg, "camera_id", None) if not isinstance(scfg, KafkaSourceConfig) else None
        if wanted is not None and fixed and cfg.model.head_key(fixed) not in wanted:
            continue  # a camera we are not refitting: not read at all
        overrides = {}
        if isinstance(scfg, SyntheticSourceConfig):
            overrides = {"anomaly_every": 0, "realtime": False, "num_frames": limit * stride}
        source = build_source(scfg, **overrides)
        mine: set[str] = set()
        try:
            for frame in source:
                cam = frame.camera_id
                if wanted is not None and cfg.model.head_key(cam) not in wanted:
                    continue
                mine.add(cam)
                n = seen[cam] = seen.get(cam, 0) + 1
                got = frames.setdefault(cam, [])
                if (n - 1) % stride == 0 and len(got) < limit and not frame.meta.get("anomaly"):
                    try:
                        got.append(prepare_frame(frame, size).image)  # type: ignore[arg-type]
                        bar.update(1)
                    except (DecodeError, ValueError) as e:
                        log.warning("fit: skipping frame %s/%s: %s", cam, frame.seq, e)
                if all(len(frames[c]) >= limit for c in mine):
                    break
        finally:
            source.close()
    bar.close()
    return {cam: np.stack(images) for cam, images in frames.items() if images}


def fit_camera_heads(
    cfg: OddeyeConfig, cameras: Sequence[str] | None = None, progress: bool = True
) -> dict[str, LoadedHead]:
    """scope camera: fit one head per camera (or group) from its own frames; each is written as a new version.

    With ``cameras`` only theirs are refitted. A requested camera with fewer than 2 frames in the
    sources is a ``FitError`` and nothing is written: its current head stays.
    """
    device = resolve_device(cfg.model.device)
    m = cfg.model
    heads = CameraHeads.open(m.directory, m.name, m.params, m.image_size, device, m.head_dtype)
    # The shared backbone as the model actors run it (folded batch norms, precision): heads learn the
    # very features they will score.
    prepare_model(heads.template, device, m.precision, m.compile)
    by_camera = collect_camera_images(cfg, cameras, progress)
    for cam in cameras or []:
        if len(by_camera.get(cam, ())) < 2:
            versions = heads.versions(m.head_key(cam))
            kept = f"its head v{versions[-1]} stays" if versions else "it has no head yet"
            raise FitError(
                f"camera {cam!r}: {len(by_camera.get(cam, ()))} frame(s) in the configured sources, at least 2 "
                f"needed to fit a head; nothing written ({kept})"
            )
    if not by_camera:
        raise FitError("no camera gave any frames to fit on: check the config's sources (or fit.source)")
    keys: dict[str, list[str]] = {}
    for cam in by_camera:
        keys.setdefault(m.head_key(cam), []).append(cam)
    fitted = {}
    for key, cams in keys.items():
        images = np.concatenate([by_camera[c] for c in cams])
        if len(images) < 2:
            raise FitError(f"camera {key!r}: {len(images)} frame(s), at least 2 needed to fit a head")
        # Several cameras in one group: the normalisation holds out whole cameras.
        videos = np.concatenate([np.full(len(by_camera[c]), i) for i, c in enumerate(cams)]) if len(cams) > 1 else None
        log.info("fitting the %s head of %s on %d frames", m.name, key, len(images))
        batches = TensorBatches(images, cfg.fit.batch_size, device, videos)
        fitted[key] = heads.save_head(key, heads.fit_head(batches, holdout_folds(cfg), progress))
    return fitted


def category_checkpoint(checkpoint: str | Path, category: str, several: bool = True) -> Path:
    """The checkpoint of one dataset category: ``{category}`` in the path is replaced; else, when the data
    holds ``several`` categories, ``-<category>`` is added to the file name (``out/padim.pt`` →
    ``out/padim-bottle.pt``); a single category keeps the path the user gave."""
    text = str(checkpoint)
    if "{category}" in text:
        return Path(text.replace("{category}", category))
    path = Path(text)
    if not several:
        return path
    return path.with_name(f"{path.stem}-{category}{path.suffix}")


def collect_folder_images(
    data: str | Path, size: tuple[int, int], max_frames: int | None = None
) -> tuple[np.ndarray, str]:
    """Normal images of a dataset category (its train split) or a plain image folder; and the category name.

    With more than ``max_frames`` images an evenly spaced subset is used.
    """
    from oddeye.data.images import DatasetError, list_images, load_images, open_category

    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"fit data folder {path} does not exist")
    name = path.name
    if path.name == "good" and path.parent.name == "train":  # <category>/train/good given directly
        name, paths = path.parent.parent.name, list_images(path)
    elif list_images(path):
        paths = list_images(path)  # a plain folder of normal images
    else:
        try:
            paths = open_category(path).train
        except DatasetError as e:
            raise FitError(f"{e} (or give a plain folder of normal images)") from None
    if max_frames is not None and len(paths) > max_frames:
        log.info("fit: using %d of the %d images in %s (fit.max_frames)", max_frames, len(paths), path)
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_frames).round().astype(int)]
    if len(paths) < 2:
        raise FitError(f"fit needs at least 2 normal images, {path} gave {len(paths)}")
    return load_images(paths, size), name


def holdout_folds(cfg: OddeyeConfig) -> int:
    """Folds of held-out normal images for the normalisation: ``fit.val_fraction`` is the share of one fold."""
    return max(2, round(1 / cfg.fit.val_fraction))


def fit_images(
    cfg: OddeyeConfig,
    images: np.ndarray,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    videos: np.ndarray | None = None,
) -> tuple[AnomalyModel, Path]:
    """Fit ``cfg.model`` on every normal image [N, H, W, 3] uint8 and write it to ``checkpoint``.

    The model learns from all N images; the score normalisation comes from k-fold held-out
    scores (``AnomalyModel.fit``) over contiguous blocks of the frames — or over whole
    videos when ``videos`` [N] says which video each frame comes from — with
    k = 1 / ``fit.val_fraction``. Holding back a validation share instead would teach the
    model from fewer images, and every k-th frame would have near-copies in training.
    """
    device = resolve_device(cfg.model.device)
    model = create_model(cfg.model.name, image_size=cfg.model.image_size, **cfg.model.params).to(device)
    folds = holdout_folds(cfg)
    log.info("fitting %s on %d frames (normalised on %d held-out folds) on %s", model.name, len(images), folds, device)
    batches = TensorBatches(images, cfg.fit.batch_size, device, videos)
    model.fit(batches, progress=progress, folds=folds)
    path = model.save(checkpoint if checkpoint is not None else cfg.model.checkpoint)
    log.info("wrote %s", path)
    return model, path


def fit_from_config(
    cfg: OddeyeConfig, progress: bool = True, data: str | Path | None = None
) -> tuple[AnomalyModel, Path]:
    """Fit ``cfg.model`` on the fit data and write it to ``cfg.model.checkpoint``.

    With ``data`` (a dataset category or a folder of normal images) fit on its normal
    images instead, and write to ``model.checkpoint`` as given (``{category}`` in it is
    replaced by the category's name).
    """
    if data is None:
        cls = get_model_class(cfg.model.name)
        if hasattr(cls, "prepare"):  # zero-shot capable (WinCLIP): no normal frames needed when needs_fit is False
            ready = prepare_without_data(cfg)
            if ready is not None:
                return ready
        clip_length = 1
        if cls.is_video:
            clip_length = int(cfg.model.params.get("clip_length", model_params(cfg.model.name).get("clip_length", 2)))
        return fit_images(cfg, collect_fit_images(cfg, progress, clip_length), progress=progress)
    images, name = collect_folder_images(data, cfg.model.image_size, cfg.fit.max_frames)
    return fit_images(cfg, images, category_checkpoint(cfg.model.checkpoint, name, several=False), progress)


def prepare_without_data(cfg: OddeyeConfig) -> tuple[AnomalyModel, Path] | None:
    """A model that needs no normal images (``needs_fit`` False, e.g. zero-shot WinCLIP), made ready by its
    ``prepare()`` and written to ``model.checkpoint``; None when this configuration does need fit data."""
    model = create_model(cfg.model.name, image_size=cfg.model.image_size, **cfg.model.params)
    if getattr(model, "needs_fit", True):
        return None
    log.info("%s needs no fit data with these parameters: preparing it from its parameters alone", model.name)
    model.prepare()  # type: ignore[attr-defined]
    path = model.save(cfg.model.checkpoint)
    log.info("wrote %s", path)
    return model, path
