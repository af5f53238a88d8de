"""Separable Gaussian blur for smoothing anomaly maps (same size out as in).

Maps up to ``MATMUL_MAX_SIZE`` pixels a side are blurred with two matrix products by banded
matrices that hold the kernel and the reflected border (about 5× faster on the CPU than a
one-channel convolution with a 33-tap kernel, which oneDNN runs poorly); larger maps use
two 1-D convolutions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import conv2d, pad

__all__ = ["MATMUL_MAX_SIZE", "GaussianBlur2d", "gaussian_kernel1d"]

# Largest side blurred by matrix products: their cost grows with the side, a convolution's does not.
MATMUL_MAX_SIZE = 512


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
        if half < min(h, w) and max(h, w) <= MATMUL_MAX_SIZE:
            rows = self._band(h, x)  # [H, H]
            cols = self._band(w, x)  # [W, W]
            return rows @ (x @ cols.T)
        k = self.kernel.to(dtype=x.dtype)
        kx = k.view(1, 1, 1, -1).expand(self.channels, 1, 1, -1)
        ky = k.view(1, 1, -1, 1).expand(self.channels, 1, -1, 1)
        x = conv2d(pad(x, (half, half, 0, 0), mode=_pad_mode(half, w)), kx, groups=self.channels)
        return conv2d(pad(x, (0, 0, half, half), mode=_pad_mode(half, h)), ky, groups=self.channels)

    def _band(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """[size, size] matrix of the 1-D blur along one axis, reflected border included (cached)."""
        cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = self.__dict__.setdefault("_bands", {})
        key = (size, like.device, like.dtype)
        if key not in cache:
            cache[key] = band_matrix(self.kernel.cpu(), size).to(device=like.device, dtype=like.dtype)
        return cache[key]

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, channels={self.channels}, kernel_size={self.kernel_size}"


def band_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """M [size, size] with ``(M @ v)[i] = sum_j kernel[j] v[reflect(i + j - half)]``: a 1-D convolution
    with reflected borders (``pad(mode="reflect")``) as a matrix. Needs ``half < size``."""
    half = kernel.shape[0] // 2
    source = torch.arange(-half, size + half).abs()
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)  # reflect, no edge repeat
    windows = source.unfold(0, kernel.shape[0], 1)  # [size, kernel]: the inputs of each output
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.scatter_add_(1, windows, kernel.to(torch.float64).expand(size, -1))
    return matrix.to(torch.float32)


def _pad_mode(half: int, size: int) -> str:
    return "reflect" if half < size else "replicate"
