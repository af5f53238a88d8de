"""Pretrained weights for AI-VAD's torchvision and timm networks, online or from local files.

Each network loads, in order of preference: a local state_dict named by the model's
``weights`` parameter (``weights: {regions: PATH, flow: PATH, pose: PATH, deep: PATH}``),
torchvision's / timm's usual pretrained weights (from the local cache when present), or
random initialisation when ``pre_trained`` is false. A download that cannot happen fails
fast with a :class:`WeightsUnavailableError` naming the option to set instead.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from oddeye.models.components.feature_extractor import WeightsUnavailableError, read_state_dict

__all__ = ["STAGES", "build_torchvision", "load_local", "weights_error"]

log = logging.getLogger(__name__)

STAGES = ("regions", "flow", "pose", "deep")
_PROBE_TIMEOUT_S = 3.0


def weights_error(stage: str, what: str, reason: str) -> WeightsUnavailableError:
    """The error for missing pretrained weights: says which option points at local ones."""
    return WeightsUnavailableError(
        f"pretrained weights for the AI-VAD {stage} network ({what}) could not be fetched ({reason}). "
        f"On a machine without internet set `weights: {{{stage}: <local state_dict file>}}` in the model params, "
        f"pick a weight-free backend, or `pre_trained: false` for random weights (tests only)."
    )


def load_local(module: nn.Module, path: str | Path, stage: str) -> None:
    """Load a state_dict file (safetensors or ``torch.save``d, read safely) into ``module``, strictly."""
    path = Path(path)
    try:
        state = read_state_dict(path)
    except FileNotFoundError as e:
        raise WeightsUnavailableError(f"`weights.{stage}`: {e}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"`weights.{stage}` {path}: weights do not fit the {stage} network "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    log.info("loaded AI-VAD %s weights from %s", stage, path)


def _url_cached_or_reachable(url: str) -> tuple[bool, str]:
    """Is ``url`` already in torch's hub cache, or can we open a connection to its host?"""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return True, ""
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"{host} unreachable and not in the cache {cached.parent}: {e}"


def build_torchvision(
    builder: Callable[..., nn.Module],
    default_weights: Any,
    stage: str,
    pre_trained: bool,
    path: str | None,
    random_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision network from a local file, its default pretrained weights, or randomly.

    ``random_kwargs`` are extra constructor arguments for a build without pretrained
    weights (e.g. ``weights_backbone=None`` so that no backbone is fetched either).
    """
    random_kwargs = random_kwargs or {}
    what = f"{builder.__name__}, {default_weights}"
    if path is not None:
        model = builder(weights=None, **random_kwargs, **kwargs)
        load_local(model, path, stage)
    elif pre_trained:
        ok, reason = _url_cached_or_reachable(default_weights.url)
        if not ok:
            raise weights_error(stage, what, reason)
        try:
            model = builder(weights=default_weights, progress=False, **kwargs)
        except Exception as e:
            raise weights_error(stage, what, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    else:
        model = builder(weights=None, **random_kwargs, **kwargs)
    return model.eval().requires_grad_(False)
