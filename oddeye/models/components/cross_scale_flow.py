"""CS-Flow's cross-scale flow: coupling blocks that see every scale at once (Rudolph et al., 2022).

https://arxiv.org/abs/2110.02855. The flow takes one feature map per scale (each half the
size of the previous) and keeps them separate, but each coupling's subnet (``CrossConvolutions``)
mixes scales: a scale's scale/shift coefficients come from its own features plus the upsampled
coarser and the strided finer neighbour. Built as FrEIA invertible modules in a ``GraphINN``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import FrEIA.framework as ff
import FrEIA.modules as fm
import torch
from torch import nn
from torch.nn.functional import interpolate, leaky_relu

__all__ = ["CrossConvolutions", "ParallelGlowCoupling", "ParallelPermute", "cross_scale_flow"]

# The soft clamp's atan is scaled so that clamp * 0.636 * atan(s / clamp) → ±clamp (2/π ≈ 0.636).
_ATAN_SCALE = 0.636


class CrossConvolutions(nn.Module):
    """Subnet over all scales: own conv → LeakyReLU → conv, plus neighbours' upsampled/strided convs.

    The outputs are multiplied by learnt gains that start at 0, so every coupling starts as
    the identity (as in the paper).
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int = 3, n_scales: int = 3
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.n_scales = n_scales
        self.first = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad) for _ in range(n_scales)
        )
        self.second = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(n_scales)
        )
        # from scale i+1 (coarser) up to i, and from i (finer) down to i+1
        self.up = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(n_scales - 1)
        )
        self.down = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad, stride=2) for _ in range(n_scales - 1)
        )
        self.gamma = nn.Parameter(torch.zeros(n_scales))

    def forward(self, scales: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [leaky_relu(conv(x), 0.1) for conv, x in zip(self.first, scales, strict=True)]
        out = [conv(h) for conv, h in zip(self.second, hidden, strict=True)]
        for i in range(self.n_scales - 1):
            coarse = interpolate(hidden[i + 1], size=hidden[i].shape[-2:], mode="bilinear", align_corners=False)
            out[i] = out[i] + self.up[i](coarse)
            out[i + 1] = out[i + 1] + self.down[i](hidden[i])
        return [o * g for o, g in zip(out, self.gamma, strict=True)]


class ParallelPermute(fm.InvertibleModule):
    """The same fixed random channel permutation on every scale (log-det 0)."""

    def __init__(self, dims_in: Sequence[Sequence[int]], seed: int = 0) -> None:
        super().__init__(dims_in)
        channels = dims_in[0][0]
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(
        self, x: Iterable[torch.Tensor], rev: bool = False, jac: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        index = self.perm_inv if rev else self.perm
        x = list(x)
        return [t[:, index] for t in x], torch.zeros(x[0].shape[0], device=x[0].device)

    def output_dims(self, input_dims: Sequence[Sequence[int]]) -> Sequence[Sequence[int]]:
        return input_dims


class ParallelGlowCoupling(fm.InvertibleModule):
    """Two affine couplings (each half conditions the other) on every scale, subnets crossing scales.

    Scale coefficients are soft-clamped: ``exp(clamp · 0.636 · atan(s / clamp))``.
    """

    def __init__(
        self, dims_in: Sequence[Sequence[int]], clamp: float = 3.0, hidden_channels: int = 1024, kernel_size: int = 3
    ) -> None:
        super().__init__(dims_in)
        channels = dims_in[0][0]
        if any(d[0] != channels for d in dims_in):
            raise ValueError(f"every scale needs the same channels, got {[d[0] for d in dims_in]}")
        self.clamp = float(clamp)
        self.len1, self.len2 = channels // 2, channels - channels // 2
        n = len(dims_in)
        self.subnet1 = CrossConvolutions(self.len1, 2 * self.len2, hidden_channels, kernel_size, n)  # first → second
        self.subnet2 = CrossConvolutions(self.len2, 2 * self.len1, hidden_channels, kernel_size, n)  # second → first

    def _log_scale(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * _ATAN_SCALE * torch.atan(s / self.clamp)

    def forward(
        self, x: Iterable[torch.Tensor], rev: bool = False, jac: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = list(x)
        a = [t[:, : self.len1] for t in x]
        b = [t[:, self.len1 :] for t in x]
        log_det = torch.zeros(x[0].shape[0], device=x[0].device, dtype=x[0].dtype)
        if not rev:
            coeff = self.subnet2(b)
            new_a = []
            for t, r in zip(a, coeff, strict=True):
                ls = self._log_scale(r[:, : self.len1])
                new_a.append(t * torch.exp(ls) + r[:, self.len1 :])
                log_det = log_det + ls.flatten(1).sum(1)
            coeff = self.subnet1(new_a)
            new_b = []
            for t, r in zip(b, coeff, strict=True):
                ls = self._log_scale(r[:, : self.len2])
                new_b.append(t * torch.exp(ls) + r[:, self.len2 :])
                log_det = log_det + ls.flatten(1).sum(1)
            a, b = new_a, new_b
        else:
            coeff = self.subnet1(a)
            new_b = []
            for t, r in zip(b, coeff, strict=True):
                ls = self._log_scale(r[:, : self.len2])
                new_b.append((t - r[:, self.len2 :]) * torch.exp(-ls))
                log_det = log_det - ls.flatten(1).sum(1)
            coeff = self.subnet2(new_b)
            new_a = []
            for t, r in zip(a, coeff, strict=True):
                ls = self._log_scale(r[:, : self.len1])
                new_a.append((t - r[:, self.len1 :]) * torch.exp(-ls))
                log_det = log_det - ls.flatten(1).sum(1)
            a, b = new_a, new_b
        return [torch.cat([ta, tb], dim=1) for ta, tb in zip(a, b, strict=True)], log_det

    def output_dims(self, input_dims: Sequence[Sequence[int]]) -> Sequence[Sequence[int]]:
        return input_dims


def cross_scale_flow(
    dims: Sequence[Sequence[int]], n_coupling_blocks: int = 4, clamp: float = 3.0, hidden_channels: int = 1024
) -> ff.GraphINN:
    """The CS-Flow graph on scales of shape ``dims`` ([C, h, w], each half the previous): permute → couple, n times.

    Kernels are 3×3 except the last block's 5×5 (the paper's choice). Call it with a list of
    per-scale maps; it returns the per-scale latents and the log-determinant per sample.
    """
    if n_coupling_blocks < 1:
        raise ValueError(f"n_coupling_blocks must be ≥ 1, got {n_coupling_blocks}")
    if dims[0][0] < 2:
        raise ValueError(f"a coupling needs at least 2 channels to split, got {dims[0][0]}")
    inputs = [ff.InputNode(*[int(d) for d in shape], name=f"scale{i}") for i, shape in enumerate(dims)]
    nodes: list[ff.Node] = []
    last = [node.out0 for node in inputs]
    for k in range(n_coupling_blocks):
        perm = ff.Node(last, ParallelPermute, {"seed": k}, name=f"permute{k}")
        kernel = 5 if k == n_coupling_blocks - 1 else 3
        args = {"clamp": clamp, "hidden_channels": hidden_channels, "kernel_size": kernel}
        coupling = ff.Node([(perm, i) for i in range(len(dims))], ParallelGlowCoupling, args, name=f"couple{k}")
        nodes += [perm, coupling]
        last = [(coupling, i) for i in range(len(dims))]
    outputs = [ff.OutputNode(out, name=f"z{i}") for i, out in enumerate(last)]
    return ff.GraphINN(inputs + nodes + outputs)
