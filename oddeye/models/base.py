"""The model interface, score normalisation, checkpoints and the registry.

A model is a plain ``torch.nn.Module``: ``fit`` learns normality explicitly,
``forward`` only scores (no hidden side effects), ``save``/``load`` keep config,
weights and normalisation together in a checkpoint that loads with
``torch.load(weights_only=True)`` — never unpickling code.
"""

from __future__ import annotations

import enum
import functools
import inspect
import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from oddeye.frames import Prediction
from oddeye.models.registry import create_model, get_model_class, list_models, model_params, register

__all__ = [
    "AnomalyModel",
    "CheckpointError",
    "FitError",
    "ScoreNormalizer",
    "VideoAnomalyModel",
    "create_model",
    "get_model_class",
    "list_models",
    "load_model",
    "model_params",
    "register",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Constructor parameters that say where pretrained weights come from. A checkpoint
# already holds the weights, so loading one never fetches them again.
WEIGHT_SOURCE_PARAMS = {"pre_trained": False, "weights": None}


class FitError(ValueError):
    """Fitting cannot proceed (no images, mixed sizes, ...)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or belongs to another model."""


def load_model(
    path: str | Path | bytes, map_location: str | torch.device = "cpu", expect: str | None = None
) -> AnomalyModel:
    """Load any registered model from a checkpoint written by ``save`` (a path, or its bytes)."""
    if isinstance(path, (bytes, bytearray)):
        ckpt = read_checkpoint(path, map_location)
        path = "<checkpoint bytes>"
    else:
        ckpt = read_checkpoint(path, map_location)
    name = ckpt["model"]
    if expect is not None and name != expect:
        raise CheckpointError(f"{path}: checkpoint holds model {name!r}, not {expect!r}")
    params = dict(ckpt["config"])
    for key, value in WEIGHT_SOURCE_PARAMS.items():
        if key in params:
            params[key] = value
    try:
        model = create_model(name, **params)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match model {name!r} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.fitted = True
    model.eval()
    return model


def read_checkpoint(path: str | Path | bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (or its bytes) with the safe loader: tensors and plain data only."""
    if isinstance(path, (bytes, bytearray)):
        source: Any = io.BytesIO(path)
        path = "<checkpoint bytes>"
    else:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        source = path
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # the safe unpickler refuses code and anything unexpected
        reason = (
            "it holds objects other than tensors and plain data"
            if "weights_only" in str(e) or "Unsupported global" in str(e)
            else (str(e).splitlines() or ["empty or truncated file"])[0]
        )
        raise CheckpointError(
            f"{path}: not a loadable oddeye checkpoint ({type(e).__name__}: {reason}); refusing to unpickle it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an oddeye checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


class ScoreNormalizer(nn.Module):
    """Maps raw anomaly scores to [0, 1] so that 0.5 means the same for every model.

    From raw scores of *normal* validation images it keeps a threshold ``t`` (the
    ``quantile`` of the normal scores plus ``margin`` robust spreads) and a scale ``s``
    (the spread between the median and that quantile); a raw score ``x`` becomes
    ``sigmoid((x - t) / s)``. So a normal image scores well below 0.5, the most unusual
    normal images land near it, and clear anomalies approach 1.
    """

    def __init__(self, quantile: float = 0.99, margin: float = 0.25) -> None:
        super().__init__()
        self.quantile = quantile
        self.margin = margin
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    @torch.no_grad()
    def fit(self, raw_scores: torch.Tensor) -> None:
        raw = raw_scores.detach().flatten().double().cpu()
        raw = raw[torch.isfinite(raw)]
        if raw.numel() < 2:
            raise FitError("need at least 2 finite validation scores to normalise")
        median = raw.median()
        high = torch.quantile(raw, self.quantile)
        spread = float(high - median)
        if not math.isfinite(spread) or spread <= 1e-12:
            spread = max(float(raw.std()), 1e-6 * max(1.0, abs(float(median))))
        self.threshold.fill_(float(high) + self.margin * spread)
        self.scale.fill_(spread)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((raw - self.threshold.to(raw.dtype)) / self.scale.to(raw.dtype))


class AnomalyModel(nn.Module):
    """Base class of image anomaly models.

    Subclasses implement ``_fit_normal`` (learn from an iterator of normal image
    batches) and ``raw_forward`` (raw score [B] and raw map [B, H, W] or None for a
    batch of images [B, 3, H, W] float in [0, 1]). The base class handles
    normalisation, ``forward``, checkpoints and input checks.
    """

    name: ClassVar[str] = ""
    is_video: ClassVar[bool] = False

    def __init__(self, image_size: tuple[int, int] | list[int] = (256, 256)) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.normalizer = ScoreNormalizer()
        self.fitted = False
        self._config: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass ``__init__`` so the outermost call records its arguments for ``save``.

        The constructor arguments (defaults filled in) are the model's config: a checkpoint
        rebuilds the model with them. No model has to list them again.
        """
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: AnomalyModel, *args: Any, **kw: Any) -> None:
            outermost = not getattr(self, "_recording_config", False)
            if outermost:
                object.__setattr__(self, "_recording_config", True)
            try:
                init(self, *args, **kw)
            finally:
                if outermost:
                    object.__setattr__(self, "_recording_config", False)
            if outermost:
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                params = {
                    k: v
                    for k, v in list(bound.arguments.items())[1:]
                    if sig.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                }
                if "image_size" in params:
                    params["image_size"] = list(self.image_size)
                self._config = {k: _plain(v) for k, v in params.items()}

        cls.__init__ = recording_init  # type: ignore[method-assign]

    # -- configuration kept in checkpoints
    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    # -- to implement
    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        """Learn normality from ``batches`` (re-iterable when the caller's loader is)."""
        raise NotImplementedError

    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(raw score [B], raw map [B, H, W] or None[, per-item region boxes [N, 5] for video models])."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return _check_images(x, self.image_size)

    # -- public API
    def fit(
        self,
        train_loader: Iterable[torch.Tensor],
        val_loader: Iterable[torch.Tensor] | None = None,
        progress: bool = True,
    ) -> AnomalyModel:
        """Learn normality from ``train_loader`` batches, then normalisation from ``val_loader``.

        Without a validation loader the training batches are scored again (less
        conservative, but still sets a sensible scale).
        """
        self.eval()
        seen = _CheckedBatches(train_loader, self._check_input)
        self._fit_normal(seen, progress)
        if seen.count == 0:
            raise FitError("fit received no images: the training data is empty")
        val = val_loader if val_loader is not None else train_loader
        with torch.no_grad():
            raw = [self.raw_forward(b)[0].float().cpu() for b in _CheckedBatches(val, self._check_input)]
        if not raw:
            raise FitError(
                "fit received no validation images (pass a val_loader, or a re-iterable train_loader: "
                "without one the training data is scored again)"
            )
        self.normalizer.fit(torch.cat(raw))
        self.fitted = True
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Prediction:
        """Score a batch [B, 3, H, W] (float in [0, 1], or uint8) → normalised ``Prediction``."""
        if not self.fitted:
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load a checkpoint")
        out = self.raw_forward(self._check_input(images))
        score = self.normalizer(out[0].float())
        amap = None if out[1] is None else self.normalizer(out[1].float())
        boxes = None
        if len(out) > 2 and out[2] is not None:
            # Region scores share the frame score's normalisation: a box at 0.9 is as unusual as a frame at 0.9.
            boxes = [torch.cat([b[:, :4], self.normalizer(b[:, 4:5].float())], 1) for b in out[2]]
        return Prediction(score=score, anomaly_map=amap, boxes=boxes)

    def save(self, path: str | Path) -> Path:
        """Write config, weights and normalisation to one checkpoint file."""
        if not self.fitted:
            raise RuntimeError("refusing to save an unfitted model")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, "model": self.name, "config": self.config, "state_dict": state}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AnomalyModel:
        """Load a checkpoint of this model class (an error if it holds another model)."""
        return load_model(path, map_location, expect=cls.name or None)


class VideoAnomalyModel(AnomalyModel):
    """Base class of video models: they score clips [B, T, 3, H, W] of ``clip_length`` consecutive frames.

    The score of a clip is the score of its last frame; ``raw_forward`` returns
    ``(score [B], map or None, boxes)`` where ``boxes[i]`` is [N, 5] (x1, y1, x2, y2,
    raw region score) for the regions found in the last frame of clip ``i``. The live
    pipeline keeps a ring buffer per camera and never mixes cameras in a clip.
    """

    is_video: ClassVar[bool] = True

    def __init__(self, image_size: tuple[int, int] | list[int] = (256, 256), clip_length: int = 2) -> None:
        super().__init__(image_size)
        if clip_length < 1:
            raise ValueError("clip_length must be at least 1")
        self.clip_length = int(clip_length)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected clips shaped [B, T, 3, H, W], got {shape}")
        if x.shape[1] != self.clip_length:
            raise FitError(f"clips of {x.shape[1]} frames; {self.name} takes clip_length={self.clip_length}")
        b, t = x.shape[:2]
        return _check_images(x.flatten(0, 1), self.image_size).unflatten(0, (b, t))


class _CheckedBatches:
    """Iterates input batches, checking them and counting items as they pass."""

    def __init__(self, loader: Iterable[Any], check: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.loader = loader
        self.check = check
        self.count = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            if isinstance(batch, dict):
                batch = batch["image"]
            elif isinstance(batch, (tuple, list)):
                batch = batch[0]
            batch = self.check(batch)
            self.count += batch.shape[0]
            yield batch


def _check_images(images: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor batch, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped [B, 3, H, W], got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != tuple(image_size):
        raise FitError(
            f"image size {tuple(images.shape[-2:])} does not match the model's image_size {tuple(image_size)}; "
            "resize the inputs (the pipeline does this for you)"
        )
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    return images


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
