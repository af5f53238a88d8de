"""Chunked k-NN search and the memory bank, against brute force."""

from __future__ import annotations

import pytest
import torch

from oddeye.models.components import MemoryBank, knn, knn_heads, squared_distances


def test_squared_distances_match_cdist() -> None:
    x, y = torch.randn(30, 7, dtype=torch.float64), torch.randn(40, 7, dtype=torch.float64)
    torch.testing.assert_close(squared_distances(x, y), torch.cdist(x, y).pow(2))
    assert float(squared_distances(x, x).diagonal().abs().max()) < 1e-10


@pytest.mark.parametrize("chunk_size", [64, 997, 1 << 24])
@pytest.mark.parametrize("k", [1, 4])
def test_knn_matches_brute_force_for_any_chunk_size(chunk_size: int, k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 16, generator=gen), torch.randn(517, 16, generator=gen)
    distances, indices = knn(queries, bank, k=k, chunk_size=chunk_size)
    expected = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(distances, expected.values, rtol=1e-5, atol=1e-5)
    squared, _ = knn(queries, bank, k=k, chunk_size=chunk_size, squared=True)
    torch.testing.assert_close(squared, expected.values.pow(2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 5000, 1 << 24])
@pytest.mark.parametrize("k", [1, 3])
def test_knn_of_rows_searching_their_own_banks_matches_knn(chunk_size: int, k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    banks = [torch.randn(40, 8, generator=gen) + i for i in range(3)]
    index = torch.tensor([1, 0, 2, 2, 0])
    queries = torch.randn(len(index), 25, 8, generator=gen) + index.view(-1, 1, 1)
    got = knn_heads(queries, banks, index, k=k, chunk_size=chunk_size)
    expected = torch.stack([knn(q, banks[int(i)], k=k)[0] for q, i in zip(queries, index, strict=True)])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="one shape"):
        knn_heads(queries, [banks[0], banks[1][:30], banks[2]], index)


@pytest.mark.parametrize("chunk_size", [64, 1 << 24])
@pytest.mark.parametrize("k", [1, 3])
def test_batched_knn_searches_each_rows_own_bank(chunk_size: int, k: int) -> None:
    gen = torch.Generator().manual_seed(1)
    banks = torch.randn(3, 70, 8, generator=gen) + torch.arange(3.0).view(3, 1, 1)
    queries = torch.randn(3, 20, 8, generator=gen)
    distances, indices = knn(queries, banks, k=k, chunk_size=chunk_size)
    for row in range(3):
        expected = torch.cdist(queries[row], banks[row]).topk(k, dim=1, largest=False)
        assert torch.equal(indices[row], expected.indices)
        torch.testing.assert_close(distances[row], expected.values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[n, M, D\]"):
        knn(queries[:2], banks, k=k)


def test_knn_distances_are_exact_for_near_duplicates() -> None:
    # Large norms and tiny offsets: the expanded |q|²+|b|²-2q·b form alone would lose these.
    # (Offsets are powers of two, so the float32 inputs hold them exactly.)
    bank = torch.full((5, 64), 1000.0) + torch.arange(5.0).view(5, 1) * 0.25
    queries = bank[2:3] + 0.0625
    distances, indices = knn(queries, bank, k=2)
    assert indices.tolist() == [[2, 3]]
    assert distances.tolist() == [[0.5, 1.5]]


def test_knn_rejects_bad_shapes_and_k() -> None:
    with pytest.raises(ValueError, match="between 1 and the bank size"):
        knn(torch.zeros(2, 3), torch.zeros(4, 3), k=5)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        knn(torch.zeros(2, 3), torch.zeros(4, 2))


def test_memory_bank_fits_searches_and_reloads() -> None:
    features = torch.randn(50, 8)
    bank = MemoryBank(chunk_size=64).fit(features)
    assert len(bank) == 50 and bank.nbytes == 50 * 8 * 4
    d, i = bank(features[:5], k=1)
    assert torch.equal(i.squeeze(1), torch.arange(5)) and float(d.max()) < 1e-3
    fresh = MemoryBank()
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.features, features)
    with pytest.raises(RuntimeError, match="empty"):
        MemoryBank()(features)
