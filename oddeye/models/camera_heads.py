"""Per-camera heads on one shared backbone: one fitted normality per scene, one feature pass per batch.

"Normal" belongs to a scene. A model whose scoring splits into a frozen feature pass
(``AnomalyModel.embed``) and a fitted head (``score_embedding``: PaDiM's Gaussians,
PatchCore's memory bank, DFM's PCA, DFKDE's KDE, CFA's adaptor and centres) can keep one
head per camera (or per group of cameras) while every head shares the one backbone module.

A model directory holds the shared part once and the heads by camera::

    <directory>/backbone.json              model name, constructor config, weights hash
    <directory>/backbone.pt                the backbone's weights (so random or local weights reproduce)
    <directory>/cameras/<camera>/v<N>.pt   versioned heads; the newest version wins

A head checkpoint holds only its own state plus the backbone's fingerprint: loading a head
fitted on another backbone is a ``CheckpointError`` naming both. Heads can be stored in
float16 or bfloat16 (``head_dtype``), half the bytes on disk; they are upcast to float32
when loaded. Loaded heads live in a memory-bounded LRU (``max_head_bytes``), loaded lazily.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oddeye.frames import Prediction
from oddeye.models.base import (
    CHECKPOINT_FORMAT,
    WEIGHT_SOURCE_PARAMS,
    AnomalyModel,
    CheckpointError,
    create_model,
    get_model_class,
    list_models,
    model_params,
    read_checkpoint,
)
from oddeye.models.components.head_groups import HeadGroups

__all__ = ["HEAD_DTYPES", "CameraHeads", "LoadedHead", "camera_dirname", "split_models"]

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.json"
BACKBONE_WEIGHTS = "backbone.pt"
CAMERAS_DIR = "cameras"
HEAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Kept in float32 whatever the storage dtype: the score normalisation is a handful of numbers.
_FULL_PRECISION = ("normalizer.", "map_normalizer.")
_VERSION = re.compile(r"v(\d+)\.pt")


def split_models() -> list[str]:
    """Registered models whose scoring splits into a shared backbone and a head."""
    return [n for n in list_models() if get_model_class(n).splits_backbone()]


def camera_dirname(camera_id: str) -> str:
    """A file-system-safe folder name for a camera id (a checksum is added when characters were replaced)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", camera_id).strip(".") or "_"
    return safe if safe == camera_id else f"{safe}-{zlib.crc32(camera_id.encode()):08x}"


@dataclass
class LoadedHead:
    """A head in memory: the model sharing the backbone, its version, fit time and bytes."""

    key: str
    model: AnomalyModel
    version: int
    fitted_at: float
    nbytes: int


class CameraHeads:
    """One backbone (a template model) and per-camera heads of the same model class, kept in a directory."""

    def __init__(
        self,
        directory: str | Path,
        template: AnomalyModel,
        description: dict[str, Any],
        head_dtype: str = "float32",
        max_head_bytes: int | None = None,
    ) -> None:
        if head_dtype not in HEAD_DTYPES:
            raise ValueError(f"head_dtype must be one of {list(HEAD_DTYPES)}, got {head_dtype!r}")
        self.directory = Path(directory)
        self.template = template.eval()
        self.description = description
        self.fingerprint = _fingerprint(description)
        self.head_dtype = head_dtype
        self.max_head_bytes = max_head_bytes
        self.loads = 0
        self.evictions = 0
        self._heads: OrderedDict[str, LoadedHead] = OrderedDict()
        self.embed: Callable[[torch.Tensor], torch.Tensor] = self.template.embed
        """The shared feature pass ``predict`` runs: the template's ``embed``, or another runtime of it
        (``OnnxRuntimeEmbedder``)."""
        backbone = template.backbone_module()
        self._backbone_attr = next(n for n, m in template.named_children() if m is backbone)

    # ------------------------------------------------------------------ the directory
    @classmethod
    def open(
        cls,
        directory: str | Path,
        name: str | None = None,
        params: dict[str, Any] | None = None,
        image_size: tuple[int, int] | list[int] | None = None,
        device: str | torch.device = "cpu",
        head_dtype: str = "float32",
        max_head_bytes: int | None = None,
    ) -> CameraHeads:
        """Open a model directory; with ``name`` (and ``params``, ``image_size``) create it when it does not exist.

        An existing directory made for another model or other parameters is an error naming both.
        """
        directory = Path(directory)
        meta_path = directory / BACKBONE_FILE
        if not meta_path.is_file():
            if name is None:
                raise CheckpointError(f"{directory} is not a model directory (no {BACKBONE_FILE})")
            return cls._create(directory, name, params or {}, image_size, device, head_dtype, max_head_bytes)
        try:
            meta = json.loads(meta_path.read_text())
            stored_name, config = meta["model"], dict(meta["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path}: not a model directory's backbone file ({e})") from None
        if name is not None:
            wanted = _full_config(name, params or {}, image_size)
            if name != stored_name or wanted != config:
                raise CheckpointError(
                    f"model directory {directory} holds heads of {_describe(stored_name, config)}, but the config asks "
                    f"for {_describe(name, wanted)}; use another model.directory (or the parameters it was made with)"
                )
        template = _build(stored_name, config)
        state = read_checkpoint(directory / BACKBONE_WEIGHTS)["state_dict"]
        backbone = template.backbone_module()
        assert backbone is not None
        if _weights_hash(state) != meta.get("weights_sha256"):
            raise CheckpointError(f"{directory / BACKBONE_WEIGHTS}: the weights do not match {meta_path}'s hash")
        backbone.load_state_dict(state)
        return cls(directory, template.to(device), meta, head_dtype, max_head_bytes)

    @classmethod
    def _create(
        cls,
        directory: Path,
        name: str,
        params: dict[str, Any],
        image_size: tuple[int, int] | list[int] | None,
        device: str | torch.device,
        head_dtype: str,
        max_head_bytes: int | None,
    ) -> CameraHeads:
        model_cls = get_model_class(name)
        if not model_cls.splits_backbone():
            raise ValueError(
                f"model {name!r} does not split into a shared backbone and per-camera heads; "
                f"scope: camera works with {', '.join(split_models())}"
            )
        kwargs = dict(params)
        if image_size is not None:
            kwargs["image_size"] = list(image_size)
        template = create_model(name, **kwargs)
        backbone = template.backbone_module()
        assert backbone is not None
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        meta = {"model": name, "config": template.config, "weights_sha256": _weights_hash(state)}
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {"format": CHECKPOINT_FORMAT, "model": f"{name}-backbone", "state_dict": state},
            directory / BACKBONE_WEIGHTS,
        )
        tmp = directory / (BACKBONE_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.replace(directory / BACKBONE_FILE)
        log.info("created model directory %s for %s", directory, _describe(name, meta["config"]))
        return cls(directory, template.to(device), meta, head_dtype, max_head_bytes)

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def image_size(self) -> tuple[int, int]:
        return self.template.image_size

    @property
    def device(self) -> torch.device:
        return next(self.template.buffers()).device

    def head_dir(self, key: str) -> Path:
        return self.directory / CAMERAS_DIR / camera_dirname(key)

    def versions(self, key: str) -> list[int]:
        """The stored versions of a camera's (or group's) head, oldest first."""
        folder = self.head_dir(key)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.fullmatch(p.name)))

    def keys(self) -> list[str]:
        """Cameras (or groups) with at least one stored head, by the names stored in the heads."""
        root = self.directory / CAMERAS_DIR
        out = []
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            versions = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.fullmatch(p.name)))
            if versions:
                out.append(str(read_checkpoint(folder / f"v{versions[-1]}.pt")["head"]["key"]))
        return out

    # ------------------------------------------------------------------ heads
    def new_head(self) -> AnomalyModel:
        """An unfitted head: a copy of the (never fitted) template whose backbone module *is* the template's."""
        return self.template.copy_sharing_backbone().eval()

    def fit_head(self, batches: Iterable[Any], folds: int = 5, progress: bool = False) -> AnomalyModel:
        """Fit a new head on normal image batches (see ``AnomalyModel.fit``) with one backbone pass; not yet saved."""
        return self.new_head().fit_embedded(batches, folds=folds, progress=progress)

    def save_head(self, key: str, head: AnomalyModel) -> LoadedHead:
        """Write ``head`` as the next version of ``key``'s head (atomically); returns it as read back from disk."""
        if head.backbone_module() is not self.template.backbone_module():
            raise CheckpointError(f"{key}: the head does not share this directory's backbone")
        version = (self.versions(key) or [0])[-1] + 1
        fitted_at = time.time()
        dtype = HEAD_DTYPES[self.head_dtype]
        state = {
            k: (v.to(dtype) if v.is_floating_point() and not k.startswith(_FULL_PRECISION) else v).detach().cpu()
            for k, v in head.head_state().items()
        }
        meta = {"key": key, "version": version, "fitted_at": fitted_at, "fingerprint": self.fingerprint}
        meta |= {"backbone": self.description, "dtype": self.head_dtype}
        path = self.head_dir(key) / f"v{version}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {"format": CHECKPOINT_FORMAT, "model": self.name, "config": head.config, "state_dict": state, "head": meta},
            path,
        )
        log.info(
            "%s: wrote head v%d of %s (%.1f MB, %s)", key, version, self.name, _nbytes(state) / 1e6, self.head_dtype
        )
        # Read back: every replica, and this one, scores with what is stored (after the dtype round trip).
        loaded = self.load_head(path)
        if key in self._heads:
            self._install(loaded)
        return loaded

    def load_head(self, path: str | Path) -> LoadedHead:
        """Read one head checkpoint; a head of another model or backbone is a ``CheckpointError`` naming both."""
        ckpt = read_checkpoint(path)
        meta = ckpt.get("head")
        if not isinstance(meta, dict) or "fingerprint" not in meta:
            raise CheckpointError(f"{path}: not a per-camera head checkpoint (a whole model? use scope: pipeline)")
        if meta["fingerprint"] != self.fingerprint:
            theirs = meta.get("backbone") or {}
            other = _describe(theirs.get("model", ckpt["model"]), theirs.get("config", {}))
            raise CheckpointError(
                f"{path}: head fitted on the backbone of {other}"
                f" (weights {str(theirs.get('weights_sha256', '?'))[:12]}), but {self.directory} holds "
                f"{_describe(self.name, self.template.config)} (weights {self.description['weights_sha256'][:12]})"
            )
        state = ckpt["state_dict"]
        stored = HEAD_DTYPES.get(str(meta.get("dtype", "float32")), torch.float32)
        if stored != torch.float32:  # reduced-precision storage: scored in float32
            state = {k: v.float() if v.dtype == stored else v for k, v in state.items()}
        head = self.new_head()
        missing, unexpected = head.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(f"{self._backbone_attr}.")]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: head weights do not fit {self.name} (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        head.fitted = True
        head.eval()
        nbytes = _nbytes(head.head_state())
        return LoadedHead(str(meta["key"]), head, int(meta["version"]), float(meta["fitted_at"]), nbytes)

    def get(self, key: str) -> LoadedHead | None:
        """The newest head of ``key``, loaded on first use and kept in the LRU; None when none is stored."""
        loaded = self._heads.get(key)
        if loaded is not None:
            self._heads.move_to_end(key)
            return loaded
        versions = self.versions(key)
        if not versions:
            return None
        return self._install(self.load_head(self.head_dir(key) / f"v{versions[-1]}.pt"))

    def install(self, loaded: LoadedHead) -> LoadedHead:
        """Put a head in the LRU (replacing ``loaded.key``'s), evicting the least recently used over the budget."""
        return self._install(loaded)

    def _install(self, loaded: LoadedHead) -> LoadedHead:
        self._heads.pop(loaded.key, None)
        self._heads[loaded.key] = loaded
        self.loads += 1
        while self.max_head_bytes is not None and len(self._heads) > 1 and self.head_bytes > self.max_head_bytes:
            old, _ = self._heads.popitem(last=False)
            self.evictions += 1
            log.info("head of %s evicted from memory (max_head_bytes %d)", old, self.max_head_bytes)
        return loaded

    def loaded(self) -> dict[str, LoadedHead]:
        return dict(self._heads)

    @property
    def head_bytes(self) -> int:
        """Bytes of the heads in memory (the backbone not counted)."""
        return sum(h.nbytes for h in self._heads.values())

    def refresh(self) -> list[tuple[str, int, int]]:
        """Load newer stored versions of the loaded heads: [(key, old version, new version)] swapped."""
        swapped = []
        for key, loaded in list(self._heads.items()):
            versions = self.versions(key)
            if versions and versions[-1] > loaded.version:
                try:
                    new = self.load_head(self.head_dir(key) / f"v{versions[-1]}.pt")
                except CheckpointError as e:
                    log.error("%s: newer head v%d not loaded, keeping v%d: %s", key, versions[-1], loaded.version, e)
                    continue
                self._heads[key] = new
                swapped.append((key, loaded.version, new.version))
                log.info("%s: head swapped v%d → v%d", key, loaded.version, new.version)
        return swapped

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def predict(self, images: torch.Tensor, keys: list[str]) -> tuple[Prediction, list[int]]:
        """Score a batch mixing cameras: one backbone pass, then the heads. Every key must have a head.

        The heads of the keys present score together where the model has a batched form
        (``AnomalyModel.score_embedding_heads``: each row gathers its own head's state), else each
        head scores its own rows. Returns the ``Prediction`` (rows in input order) and the head
        version that scored each row.
        """
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} camera keys for a batch of {images.shape[0]}")
        x = self.template._check_input(images).to(self.device)
        embedding = self.embed(x)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        heads: dict[str, LoadedHead] = {}  # the keys present, in order of first appearance
        for key in keys:
            if key not in heads:
                loaded = self.get(key)
                if loaded is None:
                    raise KeyError(f"no head for camera {key!r} in {self.directory}")
                heads[key] = loaded
        versions = [heads[key].version for key in keys]
        position = {key: k for k, key in enumerate(heads)}
        index = torch.tensor([position[key] for key in keys], device=x.device)
        models = [loaded.model for loaded in heads.values()]
        pred = type(self.template).forward_embedding_heads(models, embedding, index, size)
        if pred is not None:
            return pred, versions
        score = torch.empty(len(keys), device=x.device)
        maps: torch.Tensor | None = None
        groups = HeadGroups(index, len(models))
        for k, model in enumerate(models):  # no batched form: each head scores its own rows
            sel = groups.rows(k)
            pred = model.forward_embedding(embedding.index_select(0, sel), size)
            score[sel] = pred.score.to(score.dtype)
            if pred.anomaly_map is not None:
                if maps is None:
                    maps = torch.zeros(len(keys), *pred.anomaly_map.shape[1:], device=x.device)
                maps[sel] = pred.anomaly_map.to(maps.dtype)
        return Prediction(score=score, anomaly_map=maps), versions


def _build(name: str, config: dict[str, Any]) -> AnomalyModel:
    """A model from a stored config, never fetching pretrained weights (they come from the directory)."""
    params = dict(config)
    for key, value in WEIGHT_SOURCE_PARAMS.items():
        if key in params:
            params[key] = value
    try:
        return create_model(name, **params)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"cannot build {name}: {e}") from e


def _full_config(name: str, params: dict[str, Any], image_size: tuple[int, int] | list[int] | None) -> dict[str, Any]:
    """The config a model built with ``params`` would record (defaults filled in), as JSON would store it."""
    defaults = {k: v for k, v in model_params(name).items() if v is not inspect.Parameter.empty}
    config = {**defaults, **params}
    if image_size is not None:
        config["image_size"] = list(image_size)
    return json.loads(json.dumps(config, default=lambda v: getattr(v, "value", str(v))))


def _describe(name: str, config: dict[str, Any]) -> str:
    keys = ("backbone", "layers", "layer", "pre_trained", "weights", "image_size")
    shown = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return f"{name} ({shown})"


def _fingerprint(description: dict[str, Any]) -> str:
    text = json.dumps({k: description[k] for k in ("model", "config", "weights_sha256")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
