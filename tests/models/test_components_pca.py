"""PCA against scikit-learn: components, variance levels, inverse transform, reloading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import decomposition

from oddeye.models.components import PCA


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("n", "d"), [(400, 12), (10, 60)])  # tall (eigh path) and wide (SVD path)
@pytest.mark.parametrize("n_components", [3, 0.9])
def test_pca_matches_sklearn(n: int, d: int, n_components: int | float) -> None:
    x = _data(n, d)
    ours = PCA(n_components).fit(x)
    ref = decomposition.PCA(n_components, svd_solver="full").fit(x.numpy())
    assert ours.num_components == ref.n_components_
    np.testing.assert_allclose(np.abs(ours.singular_vectors.T.numpy()), np.abs(ref.components_), atol=1e-4)
    np.testing.assert_allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-4)
    projected = ours.transform(x)
    np.testing.assert_allclose(np.abs(projected.numpy()), np.abs(ref.transform(x.numpy())), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        ours.inverse_transform(projected).numpy(), ref.inverse_transform(ref.transform(x.numpy())), atol=1e-3
    )


def test_full_rank_pca_reconstructs_exactly() -> None:
    x = _data(50, 8).float()
    pca = PCA(8).fit(x)
    torch.testing.assert_close(pca.inverse_transform(pca(x)), x, rtol=1e-4, atol=1e-3)
    assert PCA(1.0).fit(x).num_components == 8


def test_pca_is_reproducible_and_reloads() -> None:
    x = _data(100, 10).float()
    a, b = PCA(4).fit(x), PCA(4).fit(x.flip(0))  # same data, other order: same signs
    torch.testing.assert_close(a.singular_vectors, b.singular_vectors, rtol=1e-4, atol=1e-5)
    fresh = PCA(4)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.transform(x), a.transform(x))


def test_pca_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PCA(1.5)
    with pytest.raises(ValueError, match="at least 1"):
        PCA(0)
    with pytest.raises(ValueError, match="exceeds"):
        PCA(20).fit(torch.randn(10, 5))
    with pytest.raises(RuntimeError, match="not fitted"):
        PCA(2).transform(torch.randn(3, 4))
