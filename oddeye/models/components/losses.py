"""Losses shared by the models trained on synthesised defects (DRAEM, DSR, GLASS): focal loss and SSIM."""

from __future__ import annotations

import torch
from torch.nn.functional import conv2d, pad

from oddeye.models.components.blur import gaussian_kernel1d

__all__ = ["binary_cross_entropy", "focal_loss", "ssim", "ssim_loss"]


def binary_cross_entropy(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean BCE from probabilities; unlike torch's, a NaN input gives a NaN loss (so the trainer can stop
    with the step number) instead of an exception."""
    prob = prob.clamp(eps, 1 - eps)
    target = target.to(prob.dtype)
    return -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean()


def focal_loss(
    prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) from the probability of the anomalous class, mean over elements.

    ``prob`` and ``target`` (0/1) broadcast to the same shape. Confident right answers weigh
    ``(1 - p_t) ** gamma`` less, so the few defect pixels are not drowned by the many normal ones.
    ``alpha``: weight of the anomalous class (``1 - alpha`` for the normal one); None: equal weights.
    """
    prob = prob.clamp(eps, 1 - eps)
    target = target.to(prob.dtype)
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0):
    """Structural similarity map [B, C, H, W] of two image batches (Gaussian window, reflected borders)."""
    c = x.shape[1]
    k = gaussian_kernel1d(sigma, window_size).to(x.device, x.dtype)
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    half = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = conv2d(pad(t, (half, half, 0, 0), mode="reflect"), kx, groups=c)
        return conv2d(pad(t, (0, 0, half, half), mode="reflect"), ky, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim_loss(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """``1 - mean SSIM``: 0 for identical images."""
    return 1 - ssim(x, y, window_size).mean()
