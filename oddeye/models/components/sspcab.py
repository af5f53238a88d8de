"""SSPCAB: self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

A masked convolution sees only the four corners of a ``(2 * (kernel_dim + dilation) + 1)``-wide
window, never its centre, so it must predict the centre from context; a channel attention
(squeeze-and-excitation) block re-weights the result. DRAEM with ``enable_sspcab`` puts one
in its reconstructive encoder and adds the block's own reconstruction error to the loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import pad

__all__ = ["SSPCAB"]


class _AttentionModule(nn.Module):
    """Squeeze-and-excitation channel attention."""

    def __init__(self, channels: int, reduction_ratio: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class SSPCAB(nn.Module):
    """Masked corner convolutions + channel attention; output has the input's shape [B, C, H, W]."""

    def __init__(self, in_channels: int, kernel_dim: int = 1, dilation: int = 1, reduction_ratio: int = 8) -> None:
        super().__init__()
        if kernel_dim < 1 or dilation < 1:
            raise ValueError(f"kernel_dim and dilation must be >= 1, got {kernel_dim}, {dilation}")
        self.pad = kernel_dim + dilation
        self.border = kernel_dim + 2 * dilation + 1
        self.corners = nn.ModuleList(nn.Conv2d(in_channels, in_channels, kernel_dim) for _ in range(4))
        self.attention = _AttentionModule(in_channels, reduction_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.masked_conv(x))

    def masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The corner convolutions: output pixel (i, j) never sees input pixel (i, j)."""
        p, b = self.pad, self.border
        x = pad(x, (p, p, p, p))
        top_left = self.corners[0](x[..., :-b, :-b])
        top_right = self.corners[1](x[..., :-b, b:])
        bottom_left = self.corners[2](x[..., b:, :-b])
        bottom_right = self.corners[3](x[..., b:, b:])
        return torch.relu(top_left + top_right + bottom_left + bottom_right)
