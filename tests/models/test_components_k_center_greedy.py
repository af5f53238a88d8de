"""k-center greedy coreset: the greedy rule, coverage, chunked input, bounded memory."""

from __future__ import annotations

import pytest
import torch

from oddeye.models.components import KCenterGreedy


def _brute_force(x: torch.Tensor, first: int, size: int) -> list[int]:
    chosen, closest = [first], torch.cdist(x, x[first : first + 1]).squeeze(1)
    for _ in range(size - 1):
        nxt = int(closest.argmax())
        chosen.append(nxt)
        closest = torch.minimum(closest, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1))
    return chosen


def test_selects_like_the_plain_greedy_rule_without_projection() -> None:
    x = torch.randn(400, 8, dtype=torch.float64).float()
    sampler = KCenterGreedy(x, sampling_ratio=0.05, seed=1)  # 8 features: projecting would not reduce them
    chosen = sampler.select_coreset_idxs().tolist()
    assert len(chosen) == 20 and len(set(chosen)) == 20
    assert chosen == _brute_force(x, chosen[0], 20)


def test_coreset_covers_clusters_better_than_random() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 256, generator=gen) * 20
    x = (centres.repeat_interleave(300, dim=0) + torch.randn(3000, 256, generator=gen)).float()
    coreset = KCenterGreedy(x, sampling_ratio=10 / 3000).sample_coreset()
    assert coreset.shape == (10, 256)
    # One point per cluster: every point is close to some selected point.
    radius = torch.cdist(x, coreset).min(dim=1).values.max()
    random_radius = torch.cdist(x, x[torch.randperm(3000, generator=gen)[:10]]).min(dim=1).values.max()
    assert float(radius) < 40 < float(random_radius) or float(radius) < float(random_radius)
    assert len({int(c) for c in torch.cdist(coreset, centres).argmin(dim=1)}) == 10


def test_chunked_input_gives_the_same_coreset() -> None:
    x = torch.randn(3000, 600)
    whole = KCenterGreedy(x, 0.02, seed=5)
    chunked = KCenterGreedy(list(x.split(700)), 0.02, seed=5)
    assert torch.equal(whole.select_coreset_idxs(), chunked.select_coreset_idxs())
    assert torch.equal(chunked.sample_coreset(), x[whole.select_coreset_idxs()])
    assert whole.features.shape[1] < 600  # projected before selection


def test_working_memory_is_linear_in_rows() -> None:
    # 20 000 rows: an N × N float matrix would be 1.6 GB; the projected matrix is a few MB.
    x = torch.randn(20_000, 512)
    sampler = KCenterGreedy(x, 0.001, seed=0)
    assert sampler.select_coreset_idxs().shape == (20,)
    assert sampler.features.numel() * 4 < 40e6


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sampling_ratio"):
        KCenterGreedy(torch.randn(10, 3), 0)
    with pytest.raises(ValueError, match="differ in width"):
        KCenterGreedy([torch.randn(5, 3), torch.randn(5, 4)], 0.5)
    with pytest.raises(ValueError, match="no rows"):
        KCenterGreedy(torch.empty(0, 3), 0.5)


def _radius(x: torch.Tensor, idx: torch.Tensor) -> float:
    return float(torch.cdist(x, x[idx]).min(dim=1).values.max())


def test_batched_rounds_pick_like_one_at_a_time_and_approximate_rounds_cover_as_well() -> None:
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(40, 16, generator=gen) * 4
    x = centres[torch.randint(40, (4000,), generator=gen)] + torch.randn(4000, 16, generator=gen)
    one = KCenterGreedy(x, 0.02, seed=2, batch_size=1).select_coreset_idxs()
    batched = KCenterGreedy(x, 0.02, seed=2, batch_size=16).select_coreset_idxs()
    assert batched.tolist() == one.tolist()  # exact rounds: the same picks in the same order
    approx = KCenterGreedy(x, 0.02, seed=2, batch_size=32, tolerance=0.1).select_coreset_idxs()
    assert approx.numel() == one.numel() == 80 and len(set(approx.tolist())) == 80
    assert _radius(x, approx) <= 1.2 * _radius(x, one)  # coverage (largest distance to a centre) stays close
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        KCenterGreedy(x, 0.02, batch_size=0)
    with pytest.raises(ValueError, match=r"tolerance must be in \[0, 1\)"):
        KCenterGreedy(x, 0.02, tolerance=1.0)
