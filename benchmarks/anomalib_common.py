"""Shared pieces of the oddeye-vs-anomalib benchmarks (``benchmarks/vs_anomalib_*.py``).

anomalib 2.7.0 lives in its own virtual environment (``bash benchmarks/anomalib_env.sh``) and runs
offline: its timm backbone is built with ``pre_trained=False`` and then gets oddeye's offline
EfficientNet-Lite0 ImageNet weights, saved here once as a timm ``features_only`` state_dict.
Only the standard library is imported at module level: both environments import this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ANOMALIB_PYTHON = ROOT / ".venv-anomalib" / "bin" / "python"
BACKBONE = "efficientnet_lite0"


def anomalib_missing() -> str | None:
    """Why the anomalib environment cannot run, or None when it is there."""
    if ANOMALIB_PYTHON.is_file():
        return None
    return f"{ANOMALIB_PYTHON} is missing: run `bash benchmarks/anomalib_env.sh` first"


def subprocess_env() -> dict[str, str]:
    """The environment of both sides' processes: offline, and one malloc mmap threshold for both.

    With glibc's adaptive threshold, anomalib's k-center greedy (a fresh [N, D] temporary per step)
    grew to 20 GB on the dev VM and was OOM-killed mid-fit.
    """
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
    }


def save_backbone(extractor: Any, path: Path, **extra: Any) -> None:
    """Save an oddeye ``TimmFeatureExtractor``'s timm weights (plus ``extra`` tensors, keys prefixed ``_``)."""
    import torch

    state = dict(extractor.feature_extractor.state_dict())
    state.update({f"_{k}": v for k, v in extra.items()})
    torch.save(state, path)


def load_backbone(extractor: Any, path: str | Path, what: str) -> dict[str, Any]:
    """Load ``save_backbone``'s weights into an anomalib ``TimmFeatureExtractor``; return the extra tensors.

    Raises when a backbone weight is missing, so a renamed layer cannot leave random weights behind.
    """
    import torch

    state = torch.load(path, weights_only=True)
    extra = {k[1:]: state.pop(k) for k in [k for k in state if k.startswith("_")]}
    missing, _unexpected = extractor.feature_extractor.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"anomalib {what}: backbone weights missing {missing[:5]}")
    return extra
