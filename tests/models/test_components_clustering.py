"""k-means and the Gaussian mixture against scikit-learn on separable clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import mixture

from oddeye.models.components import GaussianMixture, KMeans


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 1.0], [0.0, 9.0, -2.0]])
    scales = torch.tensor([1.0, 0.5, 1.5]).view(3, 1)
    labels = torch.arange(3).repeat_interleave(150)
    x = centres[labels] + torch.randn(450, 3, generator=gen) * scales[labels]
    return x, labels


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same partition up to relabelling."""
    pairs = {(int(i), int(j)) for i, j in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_clusters_and_is_reproducible() -> None:
    x, labels = _blobs()
    found, centres = KMeans(3).fit(x)
    assert _agree(found, labels) and centres.shape == (3, 3)
    again, _ = KMeans(3).fit(x)
    assert torch.equal(found, again)
    assert torch.equal(KMeans(3).fit(x)[1], centres)


def test_kmeans_predict_and_reload() -> None:
    x, _ = _blobs()
    km = KMeans(3)
    labels, _ = km.fit(x)
    assert torch.equal(km.predict(x), labels)
    fresh = KMeans(3)
    fresh.load_state_dict(km.state_dict())
    assert torch.equal(fresh.predict(x), labels)


def test_kmeans_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        KMeans(0)
    with pytest.raises(ValueError, match="at least as many points"):
        KMeans(5).fit(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(2).predict(torch.randn(3, 2))
    # Fewer distinct points than clusters still works (repeated centres).
    _, centres = KMeans(3).fit(torch.ones(10, 2))
    assert torch.equal(centres, torch.ones(3, 2))


def test_gmm_matches_sklearn() -> None:
    x, labels = _blobs()
    ours = GaussianMixture(3).fit(x)
    ref = mixture.GaussianMixture(3, covariance_type="full", random_state=0).fit(x.numpy())
    assert ours.converged
    assert _agree(ours.predict(x), torch.from_numpy(ref.predict(x.numpy())))
    assert float((ours.predict(x) == ours.predict(x[labels == 0]).mode().values).float().sum()) >= 149
    np.testing.assert_allclose(ours.score_samples(x).numpy(), ref.score_samples(x.numpy()), rtol=1e-3, atol=1e-3)
    order = np.argsort(ref.means_[:, 0] + 10 * ref.means_[:, 1])
    ours_order = torch.argsort(ours.means[:, 0] + 10 * ours.means[:, 1]).numpy()
    np.testing.assert_allclose(ours.means.numpy()[ours_order], ref.means_[order], atol=1e-3)
    np.testing.assert_allclose(ours.covariances.numpy()[ours_order], ref.covariances_[order], atol=1e-3)
    np.testing.assert_allclose(ours.weights.numpy()[ours_order], ref.weights_[order], atol=1e-3)
    proba = ours.predict_proba(x)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(450, dtype=proba.dtype))


def test_gmm_scores_outliers_low_and_reloads() -> None:
    x, _ = _blobs()
    gmm = GaussianMixture(3).fit(x)
    outliers = torch.tensor([[30.0, 30.0, 30.0], [-20.0, 4.0, 0.0]])
    assert float(gmm.score_samples(outliers).max()) < float(gmm.score_samples(x).min())
    fresh = GaussianMixture(3)
    fresh.load_state_dict(gmm.state_dict())
    assert torch.equal(fresh.score_samples(x), gmm.score_samples(x))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        gmm.score_samples(torch.zeros(2, 4))
