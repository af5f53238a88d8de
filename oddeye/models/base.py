"""The model interface, score normalisation, checkpoints and the registry.

A model is a plain ``torch.nn.Module``: ``fit`` learns normality explicitly,
``forward`` only scores (no hidden side effects), ``save``/``load`` keep config,
weights and normalisation together in a checkpoint that loads with
``torch.load(weights_only=True)`` — never unpickling code.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from oddeye.frames import Prediction
from oddeye.models.registry import create_model, get_model_class, list_models, model_params, register
from oddeye.progress import progress_bar

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
# Folds of held-out normal images for the score normalisation (see ``AnomalyModel.fit``).
DEFAULT_FOLDS = 5


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
    state = _upgrade_state(ckpt["state_dict"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match model {name!r} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.fitted = True
    model.eval()
    return model


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before maps had their own normaliser: maps fall back to the score's statistics."""
    if "normalizer.threshold" in state and "map_normalizer.threshold" not in state:
        state = dict(state)
        state["map_normalizer.threshold"] = state["normalizer.threshold"]
        state["map_normalizer.scale"] = state["normalizer.scale"]
    return state


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

    def logit(self, raw: torch.Tensor) -> torch.Tensor:
        """The unsaturated value ``(x - t) / s`` in float64: it ranks like the raw score and never ties at 1."""
        raw = raw.double()
        return (raw - self.threshold.to(raw.device, torch.float64)) / self.scale.to(raw.device, torch.float64)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((raw - self.threshold.to(raw.dtype)) / self.scale.to(raw.dtype))

    @staticmethod
    def rows(normalizers: Sequence[ScoreNormalizer], index: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """``forward`` of a batch whose row ``i`` (a score, or a map) belongs to ``normalizers[index[i]]``."""
        shape = (-1,) + (1,) * (raw.ndim - 1)
        threshold = torch.stack([n.threshold for n in normalizers]).to(raw)[index].view(shape)
        scale = torch.stack([n.scale for n in normalizers]).to(raw)[index].view(shape)
        return torch.sigmoid((raw - threshold) / scale)


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
        # Maps on their own statistics: a map cell need not be on the score's scale (DFM's is ~1/16 of it).
        self.map_normalizer = ScoreNormalizer()
        self.fitted = False
        self._config: dict[str, Any] = {}
        # True while a split model fits on precomputed ``embed`` features instead of images (``fit_embedded``).
        self.embedded_inputs = False

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
        if getattr(self, "embedded_inputs", False):
            return x  # features from ``embed``, checked when they were computed
        return _check_images(x, self.image_size)

    # -- backbone and head (models whose scoring splits into a shared feature pass and a fitted head)
    @classmethod
    def splits_backbone(cls) -> bool:
        """True when ``raw_forward`` is ``score_embedding(embed(images))``: per-camera heads can share one backbone."""
        return cls.embed is not AnomalyModel.embed and cls.score_embedding is not AnomalyModel.score_embedding

    def backbone_module(self) -> nn.Module | None:
        """The frozen feature module that ``embed`` runs (shared by fold copies and per-camera heads), if any."""
        return None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone half: features [B, ...] of checked images [B, 3, H, W]; the same for every fitted head."""
        raise NotImplementedError(f"{self.name} does not split into a shared backbone and a head")

    def score_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The head half: ``raw_forward``'s outputs from ``embed``'s features, maps at ``size``."""
        raise NotImplementedError(f"{self.name} does not split into a shared backbone and a head")

    @classmethod
    def score_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, ...] | None:
        """``score_embedding`` for a batch mixing fitted heads of this class (per-camera heads on one backbone):
        row ``i`` of ``embedding`` scored by ``heads[index[i]]``, in batched passes rather than one call per
        head. The same outputs as each head's own ``score_embedding`` on its rows (up to float rounding);
        None where this model has no batched form: the caller then scores each head's rows on their own."""
        return None

    @classmethod
    def forward_embedding_heads(
        cls, heads: Sequence[AnomalyModel], embedding: torch.Tensor, index: torch.Tensor, size: tuple[int, int]
    ) -> Prediction | None:
        """``forward_embedding`` for a batch mixing heads (see ``score_embedding_heads``), or None."""
        for head in heads:
            if not head.fitted:
                raise RuntimeError(f"{head.name} is not fitted: call fit() or load a checkpoint")
        out = cls.score_embedding_heads(heads, embedding, index, size)
        if out is None:
            return None
        score = ScoreNormalizer.rows([h.normalizer for h in heads], index, out[0].float())
        amap = out[1]
        if amap is not None:
            amap = ScoreNormalizer.rows([h.map_normalizer for h in heads], index, amap.float())
        return Prediction(score=score, anomaly_map=amap)

    def embedding_of(self, inputs: torch.Tensor) -> torch.Tensor:
        """``embed(inputs)``, or ``inputs`` themselves while fitting on precomputed features."""
        return inputs if self.embedded_inputs else self.embed(inputs)

    def map_size(self, inputs: torch.Tensor) -> tuple[int, int]:
        """The size of the maps ``raw_forward`` returns: the images', or ``image_size`` for precomputed features."""
        return self.image_size if self.embedded_inputs else (int(inputs.shape[-2]), int(inputs.shape[-1]))

    def fit_embedded(self, batches: Iterable[Any], folds: int = DEFAULT_FOLDS, progress: bool = True) -> AnomalyModel:
        """``fit`` on image batches with one backbone pass: the frozen backbone's features are computed once
        and every fold fit (the normalisation's held-out scores) reuses them. Same result as ``fit``."""
        if not self.splits_backbone():
            raise TypeError(f"{self.name} does not split into a shared backbone and a head")
        cached = []
        with torch.no_grad():
            for batch in batches:
                images, videos = _unpack(batch)
                features = self.embed(self._check_input(images))
                cached.append(features if videos is None else {"image": features, "video": videos})
        self.embedded_inputs = True
        try:
            return self.fit(cached, progress=progress, folds=folds)
        finally:
            self.embedded_inputs = False

    def copy_sharing_backbone(self) -> AnomalyModel:
        """A deep copy whose frozen backbone module (``backbone_module``) *is* this model's, not a copy of it:
        for fold fits and per-camera heads, which only fit their own head on the same features."""
        shared = self.backbone_module()
        return copy.deepcopy(self, {} if shared is None else {id(shared): shared})

    def head_state(self) -> dict[str, torch.Tensor]:
        """The fitted state without the shared backbone's weights (what a per-camera head checkpoint holds)."""
        shared = self.backbone_module()
        prefixes = tuple(f"{n}." for n, m in self.named_children() if shared is not None and m is shared)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}

    # -- public API
    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        progress: bool = True,
        folds: int = DEFAULT_FOLDS,
    ) -> AnomalyModel:
        """Learn normality from every image of ``train_loader``, then the [0, 1] normalisation.

        The normaliser needs scores of normal images *the model did not see*: a model scores
        its own training images too low (a memory bank scores them 0), which puts the
        threshold too low and makes unseen normal frames look anomalous. Two ways:

        - ``val_loader`` given: the caller held out data (another video, a later block of the
          stream); the model learns from ``train_loader`` only and normalises on ``val_loader``.
        - no ``val_loader`` (what ``oddeye fit`` / ``eval`` do): the final model learns from
          *every* training image, and the statistics come from ``heldout_scores`` — by default
          k-fold over ``folds`` contiguous blocks of the training order (whole videos when the
          batches name them), each block scored by a copy of the model fitted on the other
          blocks. Contiguous blocks, not every k-th frame: an interleaved frame has a
          near-identical neighbour in training and would normalise memory banks too low.
          Models whose fit can be redone cheaply on cached features override
          ``heldout_scores`` (DFM refits only its PCA, AI-VAD only its density estimators), so
          they pay one feature pass instead of k fits. Gradient-trained models instead hold out
          the last fold (``holdout_split``): the final model itself learns from the others.

        Batches are image tensors, or dicts with ``"image"`` and optionally ``"video"`` (an
        int id per item: which video or recording it comes from, used to fold by video).
        """
        self.eval()
        if val_loader is None:
            _require_reiterable(train_loader)
        template = None
        if val_loader is None and type(self).heldout_scores is AnomalyModel.heldout_scores:
            template = self.copy_sharing_backbone()  # the unfitted model, copied for the fold fits
        seen = _CheckedBatches(train_loader, self._check_input)
        self._fit_normal(seen, progress)
        if seen.count == 0:
            raise FitError("fit received no images: the training data is empty")
        self._warn_if_few(seen.count)
        if val_loader is not None:
            scores, map_peaks = self._score_raw(_CheckedBatches(val_loader, self._check_input))
            if scores.numel() == 0:
                raise FitError("fit received no validation images: the validation data is empty")
        else:
            scores, map_peaks = self.heldout_scores(train_loader, folds, seen.count, seen.videos, template, progress)
        self.normalizer.fit(scores)
        self.map_normalizer.fit(map_peaks if map_peaks is not None and map_peaks.numel() >= 2 else scores)
        self.fitted = True
        return self

    def holdout_split(self, train_loader: Iterable[Any], folds: int) -> tuple[Iterable[Any], Iterable[Any] | None]:
        """``train_loader`` split into (the first k-1 folds, the last fold) by ``fold_assignment``.

        For models whose fit is expensive (gradient training): they learn from the first folds
        and normalise on the last with the very model that is deployed. Refitting on every
        image as well would double the fit, and a fold copy's scores are not the final
        model's (a trained model's score scale moves with its training). The last fold is the
        latest block of a stream, or its last videos. Fewer than two folds: (loader, None).
        """
        _require_reiterable(train_loader)
        seen = _CheckedBatches(train_loader, self._check_input)
        for _ in seen:
            pass
        assign = fold_assignment(seen.count, folds, seen.videos)
        k = int(assign.max()) + 1 if seen.count else 0
        if k < 2:
            return train_loader, None
        held = assign == k - 1
        log.info(
            "%s: learning from %d image(s); the last %d are held out for the score normalisation",
            self.name,
            int((~held).sum()),
            int(held.sum()),
        )
        return _Subset(train_loader, self._check_input, ~held), _Subset(train_loader, self._check_input, held)

    def heldout_scores(
        self,
        train_loader: Iterable[Any],
        folds: int,
        n: int,
        videos: torch.Tensor | None,
        template: AnomalyModel | None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw scores [N] of the ``n`` training images from models that did not see them, and their maps' peaks.

        Called by ``fit`` after the final model learnt from every image. The default fits
        ``template`` (an unfitted copy of this model) once per fold on the other folds.
        Too few images for two folds: the final model rescores its own training images,
        with a warning (the normalisation is then too low).
        """
        assign = fold_assignment(n, folds, videos)
        k = int(assign.max()) + 1 if n else 0
        if k < 2 or template is None:
            log.warning(
                "%s: %d training image(s) are too few to hold any out; normalising on the training images "
                "themselves (scores of unseen normal images will run high)",
                self.name,
                n,
            )
            return self._score_raw(_CheckedBatches(train_loader, self._check_input))
        scores, peaks = [], []
        for fold in progress_bar(range(k), desc=f"{self.name}: held-out folds", unit="fold", disable=not progress):
            model = template.copy_sharing_backbone()
            model.eval()
            model._fit_normal(_Subset(train_loader, self._check_input, assign != fold), False)
            s, p = model._score_raw(_Subset(train_loader, self._check_input, assign == fold))
            scores.append(s)
            peaks.append(p)
            del model
        maps = None if any(p is None for p in peaks) else torch.cat(peaks)  # type: ignore[arg-type]
        return torch.cat(scores), maps

    @torch.no_grad()
    def _score_raw(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw scores [N] (float64, CPU) and each raw map's maximum [N] (or None without maps)."""
        scores, peaks = [], []
        for b in batches:
            out = self.raw_forward(b)
            scores.append(out[0].detach().double().cpu())
            if out[1] is not None:
                peaks.append(out[1].detach().flatten(1).amax(1).double().cpu())
        if not scores:
            return torch.zeros(0, dtype=torch.float64), None
        return torch.cat(scores), torch.cat(peaks) if len(peaks) == len(scores) else None

    def min_fit_images(self) -> tuple[int, str] | None:
        """How many training images the model's parameters need, and why (None: no particular need).

        The default reads anomalib's parameter names of the statistical models (PaDiM's ``n_features``
        Gaussian dimensions, DFKDE's ``n_pca_components``); gradient-trained models, where such names
        mean something else, and models with other needs override it.
        """
        if hasattr(self, "training_step"):
            return None
        needs: list[tuple[int, str]] = []
        n_features = self._config.get("n_features")
        if isinstance(n_features, int) and n_features > 0:
            needs.append((n_features + 1, f"a Gaussian of n_features={n_features} dimensions per position"))
        for key in ("n_pca_components", "pca_level"):
            value = self._config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                needs.append((value + 1, f"{key}={value} principal components"))
        return max(needs) if needs else None

    def _warn_if_few(self, n: int) -> None:
        need = self.min_fit_images()
        if need is not None and n < need[0]:
            log.warning(
                "%s was fitted on %d image(s), fewer than the %d that %s needs: expect normal images to score "
                "high; fit on more frames (fit.max_frames, or a longer fit source)",
                self.name,
                n,
                need[0],
                need[1],
            )

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unsaturated scores [B] and maps [B, H, W] (or None), float64: ``forward``'s values before the sigmoid.

        ``forward``'s [0, 1] score is what alerts compare with a threshold; it saturates at 1.0 in
        float32, so clear anomalies and the worst normal frames can tie. Rankings (``oddeye eval``'s
        AUROC) use these instead: they order frames exactly as the raw scores do.
        """
        if not self.fitted:
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load a checkpoint")
        out = self.raw_forward(self._check_input(images))
        return self.normalizer.logit(out[0]), None if out[1] is None else self.map_normalizer.logit(out[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Prediction:
        """Score a batch [B, 3, H, W] (float in [0, 1], or uint8) → normalised ``Prediction``."""
        if not self.fitted:
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load a checkpoint")
        return self.normalise(self.raw_forward(self._check_input(images)))

    @torch.no_grad()
    def forward_embedding(self, embedding: torch.Tensor, size: tuple[int, int]) -> Prediction:
        """``forward`` from the shared backbone's features (``embed``): this head's normalised ``Prediction``."""
        if not self.fitted:
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load a checkpoint")
        return self.normalise(self.score_embedding(embedding, size))

    def normalise(self, out: tuple[torch.Tensor, ...]) -> Prediction:
        """``raw_forward``'s outputs → a ``Prediction`` with scores, maps and region scores in [0, 1]."""
        score = self.normalizer(out[0].float())
        amap = None if out[1] is None else self.map_normalizer(out[1].float())
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
    """Iterates input batches, checking them and counting items as they pass.

    A batch may be a tensor, a tuple/list (its first item is the images) or a dict with
    ``"image"`` and optionally ``"video"`` ([B] ints: which video each item comes from);
    ``videos`` then holds the ids of every item seen in the last complete pass.
    """

    def __init__(self, loader: Iterable[Any], check: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.loader = loader
        self.check = check
        self.count = 0
        self.videos: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.count = 0
        videos: list[torch.Tensor] | None = []
        for batch in self.loader:
            images, vid = _unpack(batch)
            images = self.check(images)
            if videos is not None and vid is not None:
                videos.append(torch.as_tensor(vid).long().flatten().cpu())
            else:
                videos = None
            self.count += images.shape[0]
            yield images
        self.videos = torch.cat(videos) if videos else None


class _Subset:
    """The items of ``loader`` whose position (over the whole pass) is selected by ``keep`` [N] bool."""

    def __init__(self, loader: Iterable[Any], check: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor):
        self.loader = loader
        self.check = check
        self.keep = keep.cpu()

    def __iter__(self) -> Iterator[torch.Tensor]:
        start = 0
        for batch in self.loader:
            images = self.check(_unpack(batch)[0])
            sel = self.keep[start : start + images.shape[0]]
            start += images.shape[0]
            if sel.all():
                yield images
            elif sel.any():
                yield images[sel.to(images.device)]


def _require_reiterable(train_loader: Iterable[Any]) -> None:
    """Holding images out for the normalisation reads ``train_loader`` more than once: a one-shot iterator can't."""
    if iter(train_loader) is train_loader:
        raise FitError(
            "fit needs a re-iterable train_loader (a list, a DataLoader) to hold out images for the normalisation, "
            "or a val_loader of held-out normal images; got a one-shot iterator"
        )


def _unpack(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, dict):
        return batch["image"], batch.get("video")
    if isinstance(batch, (tuple, list)):
        return batch[0], None
    return batch, None


def fold_assignment(n: int, folds: int, videos: torch.Tensor | None = None) -> torch.Tensor:
    """The fold [N] of each of ``n`` training items: contiguous blocks, or whole videos.

    With video ids naming at least two videos, each fold is a run of whole videos (videos in
    order of first appearance, split into at most ``folds`` groups); otherwise the items,
    in training order, are cut into ``folds`` contiguous blocks (fewer when there are fewer
    than two items per block). Never every k-th item: neighbouring frames are near-copies.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if videos is not None and videos.numel() == n:
        order: dict[int, int] = {}
        for v in videos.tolist():
            order.setdefault(int(v), len(order))
        if len(order) >= 2:
            rank = torch.tensor([order[int(v)] for v in videos.tolist()])
            k = min(folds, len(order))
            return rank * k // len(order)
    k = max(1, min(folds, n // 2))
    return torch.arange(n) * k // n


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
