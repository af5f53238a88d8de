"""Frame differencing and mask → boxes: the weight-free motion parts shared by video models."""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["frame_difference", "mask_to_boxes", "to_gray"]

_LUMA = (0.299, 0.587, 0.114)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] → [..., H, W] luma in [0, 255]."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(-3) * 255.0


def frame_difference(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Absolute luma difference [B, H, W] (0–255) between two batches of RGB frames [B, 3, H, W]."""
    return (to_gray(current) - to_gray(previous)).abs()


def mask_to_boxes(
    mask: torch.Tensor | np.ndarray, min_area: int = 1, values: torch.Tensor | None = None
) -> torch.Tensor:
    """Connected regions of a boolean mask [H, W] as boxes [N, 5]: x1, y1, x2, y2, score.

    The score of a box is the maximum of ``values`` [H, W] inside its region (its area in
    pixels when no values are given). Regions smaller than ``min_area`` pixels are dropped.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    v = values.detach().float().cpu().numpy() if values is not None else None
    out = []
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if area < min_area:
            continue
        score = float(v[labels == k].max()) if v is not None else float(area)
        out.append([x, y, x + w, y + h, score])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 5)
