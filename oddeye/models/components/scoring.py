"""Image scores from anomaly maps."""

from __future__ import annotations

import torch
from torch.nn.functional import avg_pool2d

__all__ = ["local_mean_max"]


def local_mean_max(anomaly_map: torch.Tensor, window_at_256: int = 21) -> torch.Tensor:
    """Maximum of the map's local mean [B] (DRAEM/DSR's image score), from maps [B, H, W].

    The window is ``window_at_256`` pixels on a 256-pixel image (the papers' 21×21) and scales with
    the smaller side, so one stray pixel does not decide the score and a small defect still does.
    """
    side = min(anomaly_map.shape[-2:])
    window = max(1, round(window_at_256 * side / 256)) | 1  # odd, so the mean stays centred
    pooled = avg_pool2d(anomaly_map[:, None], window, stride=1, padding=window // 2, count_include_pad=False)
    return pooled.flatten(1).amax(dim=1)
