"""One multivariate Gaussian per patch position, and the Mahalanobis distance to it (PaDiM).

Statistics can be accumulated batch by batch (``GaussianAccumulator``) so that fitting
memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.head_groups import HeadGroups

__all__ = ["MAHALANOBIS_CHUNK", "GaussianAccumulator", "MultiVariateGaussian", "mahalanobis", "mahalanobis_heads"]

log = logging.getLogger(__name__)

# PaDiM's covariance regularisation: Sigma + eps * I keeps it invertible.
COVARIANCE_EPS = 0.01
# Patch positions inverted at once (bounds the float64 working memory of the inverse).
_INV_CHUNK = 1024
# Elements of one block of deltas in ``mahalanobis`` (2^20 floats: 4 MiB): bounds its temporaries.
MAHALANOBIS_CHUNK = 1 << 20
# Elements of one block of deltas grouped by head in ``mahalanobis_heads`` (2^22 floats: 16 MiB).
MAHALANOBIS_HEADS_CHUNK = 1 << 22


class GaussianAccumulator:
    """Running count, sum and sum of outer products per patch position.

    Values are shifted by the first batch's mean before accumulating, which keeps the
    one-pass covariance accurate (no catastrophic cancellation) even in float32.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.count = 0
        self.shift: torch.Tensor | None = None  # [C, N]
        self.sum: torch.Tensor | None = None  # [C, N]
        self.sum_outer: torch.Tensor | None = None  # [N, C, C]

    @torch.no_grad()
    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings [B, C, N]."""
        if embedding.ndim != 3:
            raise ValueError(f"expected an embedding [B, C, N], got {tuple(embedding.shape)}")
        x = embedding.detach().to(self.dtype)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            c, n = self.shift.shape
            self.sum = torch.zeros(c, n, dtype=self.dtype, device=x.device)
            self.sum_outer = torch.zeros(n, c, c, dtype=self.dtype, device=x.device)
        elif x.shape[1:] != self.shift.shape:
            raise ValueError(
                f"embedding shape {tuple(x.shape[1:])} differs from earlier batches {tuple(self.shift.shape)}"
            )
        x = x - self.shift
        self.sum += x.sum(dim=0)
        xn = x.permute(2, 1, 0).contiguous()  # [N, C, B]; contiguous, or the batched matmul crawls on CPU
        self.sum_outer.baddbmm_(xn, xn.transpose(1, 2))  # += sum_b x_b x_b^T per position
        self.count += x.shape[0]

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [C, N] and unbiased covariance [N, C, C] (without regularisation)."""
        if self.count == 0 or self.shift is None:
            raise ValueError("no embeddings were accumulated")
        mean_shifted = self.sum / self.count  # [C, N]
        m = mean_shifted.T  # [N, C]
        cov = self.sum_outer - self.count * m.unsqueeze(2) * m.unsqueeze(1)
        cov /= max(self.count - 1, 1)
        return mean_shifted + self.shift, cov


class MultiVariateGaussian(DynamicBufferMixin):
    """Per-position Gaussians: buffers ``mean`` [C, N] and ``inv_covariance`` [N, C, C].

    Both buffers start empty and take their shape from ``fit`` or from a loaded state_dict.
    """

    mean: torch.Tensor
    inv_covariance: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit(self, embedding: torch.Tensor) -> MultiVariateGaussian:
        """Fit to embeddings [B, C, N] of normal images."""
        acc = GaussianAccumulator()
        acc.update(embedding)
        return self.fit_accumulated(acc)

    @torch.no_grad()
    def fit_accumulated(self, acc: GaussianAccumulator) -> MultiVariateGaussian:
        """Fit from running statistics; stores float32 buffers on this module's device."""
        mean, cov = acc.mean_and_covariance()
        n, c, _ = cov.shape
        eye = torch.eye(c, dtype=cov.dtype, device=cov.device)
        inv = torch.empty(n, c, c, dtype=torch.float32, device=cov.device)
        for start in range(0, n, _INV_CHUNK):
            block = cov[start : start + _INV_CHUNK].to(torch.float64) + COVARIANCE_EPS * eye.to(torch.float64)
            inv[start : start + _INV_CHUNK] = torch.linalg.inv(block).to(torch.float32)
        device = self.mean.device
        self.mean = mean.to(device=device, dtype=torch.float32)
        self.inv_covariance = inv.to(device)
        return self

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [B, N] of embeddings [B, C, N] to the fitted Gaussians."""
        if not self.fitted:
            raise RuntimeError("MultiVariateGaussian is not fitted")
        return mahalanobis(embedding, self.mean, self.inv_covariance, mean_t=self.mean_t())

    def mean_t(self) -> torch.Tensor:
        """``mean.T`` [N, C], contiguous, kept until the mean is refitted, loaded or moved."""
        cached = self.__dict__.get("_mean_t")
        if cached is None or cached[0] is not self.mean or cached[1] != self.mean._version:
            cached = (self.mean, self.mean._version, self.mean.T.contiguous())
            self.__dict__["_mean_t"] = cached
        return cached[2]


def mahalanobis(
    embedding: torch.Tensor,
    mean: torch.Tensor,
    inv_covariance: torch.Tensor,
    chunk_size: int = MAHALANOBIS_CHUNK,
    mean_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance [B, N] of embeddings [B, C, N] to Gaussians (mean [C, N], inverse covariance [N, C, C]).

    Works on blocks of positions with a batched matmul: each block's [n, B, C] deltas (about
    ``chunk_size`` elements) are gathered, multiplied and reduced before the next, so the
    temporaries stay bounded whatever the image size. ``mean_t`` is ``mean.T`` made
    contiguous, when the caller keeps one.
    """
    if embedding.ndim != 3 or embedding.shape[1:] != mean.shape:
        raise ValueError(f"embedding {tuple(embedding.shape)} does not match the Gaussian's mean {tuple(mean.shape)}")
    b, c, n = embedding.shape
    if mean_t is None:
        mean_t = mean.T.contiguous()  # [N, C]
    x = embedding.to(mean.dtype).permute(2, 0, 1)  # [N, B, C] view (contiguous rows for channels_last maps)
    out = torch.empty(n, b, dtype=mean.dtype, device=mean.device)
    step = max(1, chunk_size // max(b * c, 1))
    for start in range(0, n, step):
        stop = min(start + step, n)
        # contiguous deltas: a batched matmul on a permuted view is two orders of magnitude slower on CPU
        delta = torch.sub(x[start:stop], mean_t[start:stop].unsqueeze(1))
        if not delta.is_contiguous():
            delta = delta.contiguous()
        projected = torch.bmm(delta, inv_covariance[start:stop])  # [n, B, C]
        out[start:stop] = projected.mul_(delta).sum(dim=2)
    return out.clamp_min_(0).sqrt_().T.contiguous()


def mahalanobis_heads(
    embedding: torch.Tensor,
    gaussians: Sequence[MultiVariateGaussian],
    index: torch.Tensor,
    chunk_size: int = MAHALANOBIS_HEADS_CHUNK,
) -> torch.Tensor:
    """Distance [B, N] of each row ``i`` of embeddings [B, C, N] to the Gaussians of ``gaussians[index[i]]``
    (per-camera heads of one model): ``mahalanobis`` for a batch mixing heads, in one pass.

    Each row's deltas to its own head's means are taken at once; rows are then grouped by head
    (``HeadGroups``) and each head's inverse covariances multiply all its rows in one batched matmul,
    read where they are: stacking every head's [N, C, C] per batch copies more than the matmuls read
    (measured slower than one call per head). Positions go a block at a time, about ``chunk_size``
    elements of grouped deltas. Same values as each head's ``forward`` on its own rows.
    """
    if len(gaussians) == 1:
        return gaussians[0](embedding)
    b, c, n = embedding.shape
    for g in gaussians:
        if not g.fitted:
            raise RuntimeError("MultiVariateGaussian is not fitted")
        if g.mean.shape != (c, n):
            raise ValueError(f"embedding {tuple(embedding.shape)} does not match a head's mean {tuple(g.mean.shape)}")
    device, dtype = gaussians[0].mean.device, gaussians[0].mean.dtype
    groups = HeadGroups(index.to(device), len(gaussians))
    means = [g.mean_t() for g in gaussians]  # [N, C] each
    x = embedding.to(dtype).permute(0, 2, 1)  # [B, N, C]
    heads = groups.index.tolist()
    out = torch.empty(b, n, dtype=dtype, device=device)
    step = max(1, chunk_size // max(len(gaussians) * groups.width * c, 1))
    for start in range(0, n, step):
        stop = min(start + step, n)
        mean = torch.stack([means[k][start:stop] for k in heads])  # [B, n, C]: each row's head
        delta = groups.pad(torch.sub(x[:, start:stop], mean))  # [K, width, n, C]
        delta = delta.transpose(1, 2).contiguous()  # [K, n, width, C]: contiguous for the batched matmuls
        projected = torch.empty_like(delta)
        for k, g in enumerate(gaussians):
            torch.bmm(delta[k], g.inv_covariance[start:stop], out=projected[k])
        distance = projected.mul_(delta).sum(dim=3)  # [K, n, width]
        out[:, start:stop] = groups.unpad(distance.transpose(1, 2))
    return out.clamp_min_(0).sqrt_()
