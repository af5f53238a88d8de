"""Gaussian mixture with full covariances, fitted by EM from a k-means start."""

from __future__ import annotations

import logging
import math

import torch

from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.kmeans import KMeans

__all__ = ["GaussianMixture"]

log = logging.getLogger(__name__)


class GaussianMixture(DynamicBufferMixin):
    """A mixture of ``n_components`` full-covariance Gaussians (anomalib's parameter names).

    Buffers (float64): ``means`` [K, D], ``covariances`` [K, D, D], ``weights`` [K].
    EM stops after ``n_iter`` steps or when the mean log-likelihood improves by less than
    ``tol``; ``reg_covar`` is added to every covariance diagonal to keep it invertible.
    """

    means: torch.Tensor
    covariances: torch.Tensor
    weights: torch.Tensor

    def __init__(
        self, n_components: int, n_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6, seed: int = 0
    ) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be positive, got {n_components}")
        self.n_components = int(n_components)
        self.n_iter = int(n_iter)
        self.tol = float(tol)
        self.reg_covar = float(reg_covar)
        self.seed = seed
        self.converged = False
        for name in ("means", "covariances", "weights"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.means.numel() > 0

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> GaussianMixture:
        """Fit to ``data`` [N, D]."""
        if data.ndim != 2:
            raise ValueError(f"expected data [N, D], got {tuple(data.shape)}")
        if data.shape[0] < self.n_components:
            raise ValueError(f"{self.n_components} components need at least as many samples, got {data.shape[0]}")
        x = data.detach().to(torch.float64)
        labels, _ = KMeans(self.n_components, seed=self.seed).fit(x)
        resp = torch.nn.functional.one_hot(labels, self.n_components).to(x.dtype)
        self._m_step(x, resp)
        previous = -math.inf
        self.converged = False
        for step in range(self.n_iter):
            log_prob = self._weighted_log_prob(x)
            log_norm = torch.logsumexp(log_prob, dim=1)
            lower_bound = float(log_norm.mean())
            self._m_step(x, (log_prob - log_norm.unsqueeze(1)).exp())
            if abs(lower_bound - previous) < self.tol:
                self.converged = True
                log.debug("GMM converged after %d EM steps (mean log-likelihood %.4f)", step + 1, lower_bound)
                break
            previous = lower_bound
        if not self.converged:
            log.info("GMM did not converge in %d EM steps; raise n_iter or tol", self.n_iter)
        return self

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor) -> None:
        nk = resp.sum(dim=0) + 10 * torch.finfo(x.dtype).eps
        means = resp.T @ x / nk.unsqueeze(1)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        covariances = torch.stack(
            [((resp[:, k : k + 1] * (x - means[k])).T @ (x - means[k])) / nk[k] for k in range(self.n_components)]
        )
        self.means = means
        self.covariances = covariances + self.reg_covar * eye
        self.weights = nk / x.shape[0]

    def _weighted_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log(weight_k · N(x | mean_k, cov_k)) for each sample and component: [N, K]."""
        chol = torch.linalg.cholesky(self.covariances)  # [K, D, D]
        d = x.shape[1]
        diff = (x.unsqueeze(0) - self.means.unsqueeze(1)).transpose(1, 2).contiguous()  # [K, D, N]
        z = torch.linalg.solve_triangular(chol, diff, upper=False)  # [K, D, N]
        log_det = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)  # [K]
        log_gauss = -0.5 * (d * math.log(2 * math.pi) + z.pow(2).sum(dim=1)) - log_det.unsqueeze(1)
        return (log_gauss + torch.log(self.weights).unsqueeze(1)).T

    def _check(self, data: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("GaussianMixture is not fitted")
        if data.ndim != 2 or data.shape[1] != self.means.shape[1]:
            raise ValueError(f"expected data [N, {self.means.shape[1]}], got {tuple(data.shape)}")
        return data.to(self.means)

    @torch.no_grad()
    def score_samples(self, data: torch.Tensor) -> torch.Tensor:
        """Log-likelihood [N] of each sample under the mixture."""
        return torch.logsumexp(self._weighted_log_prob(self._check(data)), dim=1)

    @torch.no_grad()
    def predict_proba(self, data: torch.Tensor) -> torch.Tensor:
        """Posterior probability [N, K] of each component."""
        return torch.softmax(self._weighted_log_prob(self._check(data)), dim=1)

    @torch.no_grad()
    def predict(self, data: torch.Tensor) -> torch.Tensor:
        """Most likely component [N] of each sample."""
        return self._weighted_log_prob(self._check(data)).argmax(dim=1)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return self.score_samples(data)
