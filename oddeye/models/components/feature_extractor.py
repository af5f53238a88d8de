"""Multi-scale CNN features from a timm backbone, named the way anomalib names them.

Layers are picked by module name ("layer1", "layer2", ... for ResNets), resolved through
timm's ``feature_info`` on a meta-device dry run, so no channel tables are kept here.
Weights come from timm's usual pretrained loading, or from a local file (``weights``)
for machines with no internet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from oddeye.models.components import offline_weights

__all__ = ["TimmFeatureExtractor", "WeightsUnavailableError", "read_state_dict", "run_features_only"]

log = logging.getLogger(__name__)

# Parameter-name prefixes of classification heads: features_only models drop them.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "head_drop.", "last_linear.")
_HUB_PROBE_TIMEOUT_S = 3.0
# Looked for, in this order, when ``weights`` is a directory (a hub snapshot).
_WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline machine, hub unreachable)."""


class TimmFeatureExtractor(nn.Module):
    """Returns ``{layer_name: feature map}`` for images [B, 3, H, W] in [0, 1].

    ImageNet normalisation (the backbone's own mean/std) happens inside, so callers
    pass plain [0, 1] images. The backbone is frozen (eval mode, no gradients) unless
    ``requires_grad``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        weights: str | None = None,
        requires_grad: bool = False,
        weights_key_map: str | Sequence[Sequence[str]] | None = None,
    ) -> None:
        """``weights``: a local state_dict file or directory, or ``offline:NAME`` (see ``offline_weights``).

        ``weights_key_map`` renames the file's keys to timm's: ``"order"`` pairs them by position
        (every shape must match), or a list of ``(regex, replacement)`` rules applied in turn.
        """
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("layers must name at least one backbone layer")
        if not timm.is_model(backbone):
            raise ValueError(f"unknown backbone {backbone!r}; see timm.list_models() for the available names")
        self.backbone_name = backbone
        self.layers = [str(layer) for layer in layers]
        self.requires_grad = requires_grad

        out_indices = _resolve_layers(backbone, self.layers)
        # timm returns features in out_indices order; keep the user's order in the output.
        order = sorted(range(len(out_indices)), key=lambda i: out_indices[i])
        self._sorted_layers = [self.layers[i] for i in order]
        sorted_indices = tuple(out_indices[i] for i in order)

        if weights is not None:
            path = Path(weights)
            if str(weights).startswith(offline_weights.OFFLINE_PREFIX):
                path, default_map = offline_weights.resolve(str(weights), backbone)
                weights_key_map = weights_key_map if weights_key_map is not None else default_map
            self.feature_extractor = timm.create_model(
                backbone, pretrained=False, features_only=True, out_indices=sorted_indices
            )
            _load_local_weights(self.feature_extractor, backbone, path, weights_key_map)
        elif pre_trained:
            self.feature_extractor = _create_pretrained(backbone, sorted_indices)
        else:
            self.feature_extractor = timm.create_model(
                backbone, pretrained=False, features_only=True, out_indices=sorted_indices
            )

        info = self.feature_extractor.feature_info
        by_layer = dict(zip(self._sorted_layers, zip(info.channels(), info.reduction(), strict=True), strict=True))
        self.out_channels: list[int] = [int(by_layer[layer][0]) for layer in self.layers]
        self.reductions: list[int] = [int(by_layer[layer][1]) for layer in self.layers]

        cfg = getattr(self.feature_extractor, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        # Not persistent: derived from the backbone name, so checkpoints need not carry them.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        if not requires_grad:
            self.feature_extractor.requires_grad_(False)
            self.feature_extractor.eval()

    def train(self, mode: bool = True) -> TimmFeatureExtractor:
        """Keep a frozen backbone in eval mode (batch-norm statistics stay fixed)."""
        super().train(mode)
        if not self.requires_grad:
            self.feature_extractor.eval()
        return self

    def set_inference_net(self, net: nn.Module | None) -> None:
        """Use ``net`` (an equivalent copy of the backbone, e.g. with batch norms folded) whenever no
        gradients are needed; None goes back to the backbone itself. The copy is not a submodule:
        checkpoints, ``state_dict`` and ``.to()`` see only the backbone."""
        self.__dict__["_inference_net"] = net

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = (images.to(self.mean.dtype) - self.mean) / self.std
        grad = self.requires_grad and torch.is_grad_enabled()
        net = self.__dict__.get("_inference_net")
        if net is None or grad or (self.training and self.requires_grad):
            net = self.feature_extractor
        with torch.set_grad_enabled(grad):
            features = run_features_only(net, images)
        by_name = dict(zip(self._sorted_layers, features, strict=True))
        return {layer: by_name[layer] for layer in self.layers}


def run_features_only(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """A timm ``features_only`` network's outputs, without running blocks past the deepest requested stage.

    timm's EfficientNet/MobileNetV3 feature networks run every block whatever ``out_indices``
    asks for (its ResNet-style ``FeatureListNet`` already stops early); for those two classes
    this is their own forward with the same modules, up to the last block whose output is returned.
    """
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.mobilenetv3 import MobileNetV3Features

    if (
        type(net) not in (EfficientNetFeatures, MobileNetV3Features)
        or net.feature_hooks is not None
        or net.grad_checkpointing
    ):
        return net(images)
    stages: dict[int, int] = net._stage_out_idx
    x = net.bn1(net.conv_stem(images))
    if isinstance(net, MobileNetV3Features):
        x = net.act1(x)
    features = [x] if 0 in stages else []
    for i, block in enumerate(net.blocks[: max(stages)]):
        x = block(x)
        if i + 1 in stages:
            features.append(x)
    return features


def _resolve_layers(backbone: str, layers: Sequence[str]) -> list[int]:
    """Map layer module names to timm ``out_indices`` with a meta-device dry run."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(backbone, pretrained=False, features_only=True)
    except Exception:  # some models cannot be built on meta; fall back to a real (random) build
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
    names = list(probe.feature_info.module_name())
    # Accept both "stages.0" (module path) and "stages_0" (flattened) spellings.
    lookup = {name: i for i, name in enumerate(names)}
    lookup.update({name.replace(".", "_"): i for i, name in enumerate(names)})
    indices = []
    for layer in layers:
        if layer not in lookup:
            raise ValueError(f"backbone {backbone!r} has no feature layer {layer!r}; available: {names}")
        indices.append(lookup[layer])
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers {list(layers)} name the same feature layer twice")
    return indices


def _create_pretrained(backbone: str, out_indices: tuple[int, ...] | None = None, **create_kwargs: Any) -> nn.Module:
    """timm's normal pretrained loading, failing fast (and clearly) when the hub is unreachable.

    With ``out_indices`` a features_only model; without, the whole network built with ``create_kwargs``
    (the ViT patch-token extractor's case).
    """

    def build() -> nn.Module:
        if out_indices is None:
            return timm.create_model(backbone, pretrained=True, **create_kwargs)
        return timm.create_model(backbone, pretrained=True, features_only=True, out_indices=out_indices)

    try:
        if _env_offline():
            with _hub_offline():
                return build()
        if not _hub_reachable():
            # huggingface_hub would retry for about a minute; use the local cache only.
            log.warning("Hugging Face hub is unreachable; looking for cached %s weights only", backbone)
            with _hub_offline():
                return build()
        return build()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsUnavailableError(
            f"pretrained weights for backbone {backbone!r} could not be fetched ({reason}). "
            f"On a machine without internet, set `weights: <local path>` to a state_dict file of the backbone "
            f"(.pth/.pt/.bin or .safetensors), or `pre_trained: false` for a randomly initialised backbone."
        ) from e


def _env_offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable() -> bool:
    """Can we open a TCP connection to the hub (or the configured proxy) within a few seconds?"""
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None
    )
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:
        return True  # cannot tell; let the real download decide
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub use its local cache only (it reads HF_HUB_OFFLINE at import time)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants  # type: ignore[no-redef]
    old_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None and old_const is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None and old_const is not None:
            constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict file safely: safetensors, or ``torch.load(weights_only=True)``.

    Unwraps a ``state_dict``/``model`` wrapper and strips DataParallel's ``module.`` prefix.
    A directory (a downloaded hub snapshot) is searched for the usual weight file names.
    """
    if path.is_dir():
        found = next((path / name for name in _WEIGHT_FILE_NAMES if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"weights directory {path} holds none of {list(_WEIGHT_FILE_NAMES)}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable state_dict file ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_local_weights(
    features: nn.Module,
    backbone: str,
    path: Path,
    key_map: str | Sequence[Sequence[str]] | None = None,
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load a backbone state_dict from ``path`` into a features_only model, strictly.

    The file may hold the full classifier network (head and unused deeper stages are
    ignored) or just the feature layers. Anything else that does not fit is an error.
    ``adapt`` rewrites the (key-mapped) state first, e.g. resampling a ViT's position embeddings.
    """
    state = read_state_dict(path)
    with torch.device("meta"):
        full = timm.create_model(backbone, pretrained=False).state_dict()
    full_keys = set(full)
    if key_map is not None:
        state = map_keys(state, key_map, full, str(path))
    if adapt is not None:
        state = adapt(state)
    target = features.state_dict()

    loaded: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, param in target.items():
        src = key if key in state else _unflattened(key)
        if src is None or src not in state:
            missing.append(key)
        elif state[src].shape != param.shape:
            mismatched.append(f"{key}: file {tuple(state[src].shape)} vs model {tuple(param.shape)}")
        else:
            loaded[key] = state[src]
    used = set(loaded) | {_unflattened(k) for k in loaded}
    unexpected = [k for k in state if k not in used and k not in full_keys and not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing or mismatched or unexpected:
        raise ValueError(
            f"{path}: weights do not fit backbone {backbone!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {mismatched[:5]}"
        )
    features.load_state_dict(loaded, strict=True)
    log.info("loaded %s backbone weights from %s", backbone, path)


def map_keys(
    state: dict[str, torch.Tensor],
    key_map: str | Sequence[Sequence[str]],
    target: dict[str, torch.Tensor],
    where: str = "weights",
) -> dict[str, torch.Tensor]:
    """Rename a state_dict's keys to ``target``'s: ``"order"`` (by position, shapes checked) or regex rules."""
    if key_map == "order":
        if len(state) != len(target):
            raise ValueError(
                f"{where}: key_map 'order' needs as many tensors as the model ({len(state)} vs {len(target)})"
            )
        for (src, value), (dst, ref) in zip(state.items(), target.items(), strict=True):
            if value.shape != ref.shape:
                raise ValueError(
                    f"{where}: key_map 'order' pairs {src} {tuple(value.shape)} with {dst} {tuple(ref.shape)}; "
                    "the file's tensors are not in the model's order"
                )
        return dict(zip(target, state.values(), strict=True))
    if isinstance(key_map, str):
        raise ValueError(f"weights_key_map must be 'order' or a list of [regex, replacement] rules, got {key_map!r}")
    rules = [(re.compile(rule[0]), rule[1]) for rule in key_map]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _unflattened(key: str) -> str | None:
    """'stages_0.blocks.0.w' (timm's flattened feature-module name) -> 'stages.0.blocks.0.w'."""
    head, _, rest = key.partition(".")
    if "_" not in head or not rest:
        return None
    parent, _, child = head.rpartition("_")
    return f"{parent}.{child}.{rest}" if child.isdigit() else None
