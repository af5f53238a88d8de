"""Gaussian KDE against scipy, and the KDE classifier (PCA → scaling → KDE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from oddeye.models.components import FeatureScalingMethod, GaussianKDE, KDEClassifier


def test_kde_matches_scipy_log_density() -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(400, 3, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.7]], dtype=torch.float64
    )
    points = torch.randn(50, 3, generator=gen, dtype=torch.float64) * 2
    kde = GaussianKDE(data.float(), chunk_size=1000)  # chunks of 2 query rows
    expected = gaussian_kde(data.numpy().T).logpdf(points.numpy().T)
    np.testing.assert_allclose(kde.score_samples(points.float()).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kde(points.float()).numpy(), np.exp(expected), rtol=1e-3)


def test_kde_log_density_stays_finite_far_away() -> None:
    kde = GaussianKDE(torch.randn(200, 2))
    far = torch.tensor([[50.0, 0.0], [100.0, 0.0]])
    log_density = kde.score_samples(far)
    assert torch.isfinite(log_density).all() and float(log_density[0]) > float(log_density[1])
    assert float(kde(far).max()) == 0.0  # the plain density underflows there


def test_kde_needs_more_points_than_dimensions_and_reloads() -> None:
    with pytest.raises(ValueError, match="more than 4 points"):
        GaussianKDE(torch.randn(4, 4))
    kde = GaussianKDE(torch.randn(30, 2))
    fresh = GaussianKDE()
    fresh.load_state_dict(kde.state_dict())
    x = torch.randn(5, 2)
    assert torch.equal(fresh.score_samples(x), kde.score_samples(x))


BASIS = torch.randn(4, 32, generator=torch.Generator().manual_seed(9))


def _clusters(n: int, gen: torch.Generator, outlying: bool = False) -> torch.Tensor:
    """Points near a 4-d subspace of R^32, around one place in it (another one, as long, if ``outlying``)."""
    centre = torch.tensor([0.0, 3.0, 0.0, 0.0] if outlying else [3.0, 0.0, 0.0, 0.0])
    latent = 0.7 * torch.randn(n, 4, generator=gen) + centre
    return latent @ BASIS + 0.05 * torch.randn(n, 32, generator=gen)


def test_classifier_scores_outliers_as_anomalous() -> None:
    gen = torch.Generator().manual_seed(1)
    train, normal, outliers = _clusters(300, gen), _clusters(20, gen), _clusters(20, gen, outlying=True)
    clf = KDEClassifier(n_pca_components=4)
    assert clf.fit(train)
    assert clf.feature_scaling_method is FeatureScalingMethod.SCALE
    assert float(clf.score_samples(normal).min()) > float(clf.score_samples(outliers).max())
    assert float(clf.predict(normal).mean()) < float(clf.predict(outliers).mean())
    torch.testing.assert_close(clf.compute_kde_scores(normal, as_log_likelihood=True), clf.score_samples(normal))


def test_scaling_methods() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    scale = KDEClassifier(feature_scaling_method="scale")
    scaled, length = scale.pre_process(features)
    assert float(length) == 10.0 and torch.equal(scaled, features / 10)
    norm = KDEClassifier(feature_scaling_method=FeatureScalingMethod.NORM)
    normed, _ = norm.pre_process(features)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(2))


def test_classifier_subsamples_to_max_training_points_and_reloads() -> None:
    gen = torch.Generator().manual_seed(2)
    clf = KDEClassifier(n_pca_components=3, max_training_points=50)
    clf.fit(_clusters(500, gen))
    assert clf.kde_model.dataset.shape == (50, 3)
    fresh = KDEClassifier(n_pca_components=3)
    fresh.load_state_dict(clf.state_dict())
    x = _clusters(5, gen)
    assert torch.equal(fresh.score_samples(x), clf.score_samples(x))


def test_classifier_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="norm"):
        KDEClassifier(feature_scaling_method="max")
    with pytest.raises(ValueError, match="more than n_pca_components=16"):
        KDEClassifier().fit(torch.randn(10, 32))
    with pytest.raises(RuntimeError, match="not fitted"):
        KDEClassifier().score_samples(torch.randn(2, 32))
