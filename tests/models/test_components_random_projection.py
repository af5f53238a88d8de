"""Sparse random projection: Johnson-Lindenstrauss size, sparsity, distance preservation."""

from __future__ import annotations

import math

import pytest
import torch

from oddeye.models.components import SparseRandomProjection, johnson_lindenstrauss_min_dim


def test_jl_min_dim_matches_the_formula() -> None:
    assert johnson_lindenstrauss_min_dim(1_000_000, eps=0.5) == 663  # the value sklearn gives
    assert johnson_lindenstrauss_min_dim(10_000, eps=0.9) == int(4 * math.log(10_000) / (0.9**2 / 2 - 0.9**3 / 3))
    with pytest.raises(ValueError, match="eps"):
        johnson_lindenstrauss_min_dim(10, eps=1.5)


def test_projection_shape_sparsity_and_seed() -> None:
    x = torch.randn(2000, 900)
    a = SparseRandomProjection(eps=0.5, random_state=3).fit(x)
    b = SparseRandomProjection(eps=0.5, random_state=3).fit(x)
    k = johnson_lindenstrauss_min_dim(2000, 0.5)
    assert a.components.shape == (k, 900)
    assert torch.equal(a.components, b.components)
    density = float((a.components != 0).float().mean())
    assert density == pytest.approx(1 / 30, rel=0.1)  # 1 / sqrt(n_features)
    assert a.transform(x).shape == (2000, k)


def test_projection_preserves_distances_within_eps() -> None:
    x = torch.randn(300, 2000, dtype=torch.float64)
    proj = SparseRandomProjection(eps=0.3, random_state=0).fit(x)
    y = proj.transform(x)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)


def test_projection_caps_at_the_input_width_and_reloads() -> None:
    small = SparseRandomProjection(eps=0.9, random_state=0).fit(torch.randn(100, 20))
    assert small.components.shape == (20, 20)
    fresh = SparseRandomProjection()
    fresh.load_state_dict(small.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(fresh(x), small(x))
    with pytest.raises(RuntimeError, match="not fitted"):
        SparseRandomProjection().transform(x)
