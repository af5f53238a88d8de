"""Separable Gaussian blur for smoothing anomaly maps (same size out as in)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import conv2d, pad

__all__ = ["GaussianBlur2d", "gaussian_kernel1d"]


def gaussian_kernel1d(sigma: float, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``kernel_size``."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


class GaussianBlur2d(nn.Module):
    """Blur [B, channels, H, W] with a Gaussian, one row and one column pass.

    The kernel is built once; borders are reflected (replicated when the image is
    smaller than the kernel's half-width), so the output keeps the input's size.
    """

    kernel: torch.Tensor

    def __init__(self, sigma: float, channels: int = 1, kernel_size: int | None = None) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if kernel_size is None:
            kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.sigma = float(sigma)
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        # Derived from sigma: not persistent, so it is never stale in a checkpoint.
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma, self.kernel_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W], got {tuple(x.shape)}")
        half = self.kernel_size // 2
        if half == 0:
            return x
        h, w = x.shape[-2:]
        k = self.kernel.to(dtype=x.dtype)
        kx = k.view(1, 1, 1, -1).expand(self.channels, 1, 1, -1)
        ky = k.view(1, 1, -1, 1).expand(self.channels, 1, -1, 1)
        x = conv2d(pad(x, (half, half, 0, 0), mode=_pad_mode(half, w)), kx, groups=self.channels)
        return conv2d(pad(x, (0, 0, half, half), mode=_pad_mode(half, h)), ky, groups=self.channels)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, channels={self.channels}, kernel_size={self.kernel_size}"


def _pad_mode(half: int, size: int) -> str:
    return "reflect" if half < size else "replicate"
