"""The shared model components, each on its own: feature extractor, Gaussian, blur."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from oddeye.models.components import (
    GaussianAccumulator,
    GaussianBlur2d,
    MultiVariateGaussian,
    TimmFeatureExtractor,
    WeightsUnavailableError,
    mahalanobis,
    mahalanobis_heads,
)

LAYERS = ["layer1", "layer2", "layer3"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# -- feature extractor


def test_extractor_shapes_channels_and_order() -> None:
    fe = TimmFeatureExtractor("resnet18", LAYERS, pre_trained=False)
    assert fe.out_channels == [64, 128, 256]
    assert fe.reductions == [4, 8, 16]
    out = fe(torch.rand(2, 3, 64, 96))
    assert list(out) == LAYERS
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6)]

    reordered = TimmFeatureExtractor("resnet18", ["layer3", "layer1"], pre_trained=False)
    assert reordered.out_channels == [256, 64]
    assert list(reordered(torch.rand(1, 3, 64, 64))) == ["layer3", "layer1"]


def test_extractor_is_frozen() -> None:
    fe = TimmFeatureExtractor("resnet18", ["layer1"], pre_trained=False)
    fe.train()
    assert not fe.feature_extractor.training
    assert not any(p.requires_grad for p in fe.parameters())
    assert not fe(torch.rand(1, 3, 32, 32))["layer1"].requires_grad


def test_extractor_normalises_with_backbone_mean_std() -> None:
    fe = TimmFeatureExtractor("resnet18", ["layer2"], pre_trained=False)
    images = torch.rand(2, 3, 64, 64)
    cfg = fe.feature_extractor.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    expected = fe.feature_extractor((images - mean) / std)[0]
    torch.testing.assert_close(fe(images)["layer2"], expected)


def test_extractor_unknown_layer_lists_available() -> None:
    with pytest.raises(ValueError, match=r"layer9.*available.*layer1.*layer4"):
        TimmFeatureExtractor("resnet18", ["layer1", "layer9"], pre_trained=False)


def test_extractor_loads_local_weights(tmp_path: Path) -> None:
    source = TimmFeatureExtractor("resnet18", LAYERS, pre_trained=False)
    path = tmp_path / "backbone.pth"
    torch.save(source.feature_extractor.state_dict(), path)

    loaded = TimmFeatureExtractor("resnet18", LAYERS, pre_trained=True, weights=str(path))
    fresh = TimmFeatureExtractor("resnet18", LAYERS, pre_trained=False)
    images = torch.rand(2, 3, 64, 64)
    expected = source(images)
    for name, value in loaded(images).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert not torch.allclose(fresh(images)["layer1"], expected["layer1"])


def test_extractor_loads_wrapped_full_model_checkpoint(tmp_path: Path) -> None:
    # A whole classifier saved from DataParallel inside a {"state_dict": ...} wrapper:
    # the head and layer4 are not needed, the "module." prefix is stripped.
    full = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "full.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    fe = TimmFeatureExtractor("resnet18", ["layer2"], weights=str(path))
    torch.testing.assert_close(fe.feature_extractor.layer2[0].conv1.weight, full.layer2[0].conv1.weight)


def test_extractor_loads_safetensors(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file(full.state_dict(), str(path))
    fe = TimmFeatureExtractor("resnet18", ["layer1"], weights=str(path))
    torch.testing.assert_close(fe.feature_extractor.conv1.weight, full.conv1.weight)


def test_extractor_rejects_weights_of_another_backbone(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit backbone 'resnet18'.*unexpected"):
        TimmFeatureExtractor("resnet18", LAYERS, weights=str(path))


def test_extractor_missing_weights_names_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # An empty hub cache, so this fails even where someone has the weights cached.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        TimmFeatureExtractor("resnet18", LAYERS, pre_trained=True)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "could not be fetched" in message
    assert "weights: <local path>" in message
    assert "pre_trained: false" in message
    assert isinstance(info.value, RuntimeError)


# -- multivariate Gaussian


def _numpy_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, c, n = x.shape
    mean = x.mean(axis=0)
    inv = np.stack([np.linalg.inv(np.cov(x[:, :, i], rowvar=False) + 0.01 * np.eye(c)) for i in range(n)])
    return mean, inv


def test_gaussian_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6, 5)) * rng.uniform(0.5, 3, size=(1, 6, 1)) + 10.0
    mean_np, inv_np = _numpy_gaussian(x)
    g = MultiVariateGaussian().fit(torch.from_numpy(x).float())
    assert g.mean.dtype == torch.float32 and g.inv_covariance.shape == (5, 6, 6)
    np.testing.assert_allclose(g.mean.numpy(), mean_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.inv_covariance.numpy(), inv_np, rtol=1e-4, atol=1e-5)


def test_gaussian_accumulates_in_batches() -> None:
    x = torch.randn(90, 4, 3, dtype=torch.float64) * 5 + 100  # large offset: one-pass sums must stay exact
    whole = MultiVariateGaussian().fit(x)
    acc = GaussianAccumulator()
    for chunk in x.split(17):
        acc.update(chunk)
    batched = MultiVariateGaussian().fit_accumulated(acc)
    torch.testing.assert_close(batched.mean, whole.mean)
    torch.testing.assert_close(batched.inv_covariance, whole.inv_covariance)


def test_gaussian_state_dict_loads_into_empty_instance() -> None:
    fitted = MultiVariateGaussian().fit(torch.randn(40, 3, 8))
    fresh = MultiVariateGaussian()
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh.mean, fitted.mean)
    torch.testing.assert_close(fresh.inv_covariance, fitted.inv_covariance)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(fresh(x), fitted(x))


def test_mahalanobis_matches_direct_numpy() -> None:
    rng = np.random.default_rng(1)
    c, n, b = 5, 7, 3
    mean = rng.normal(size=(c, n))
    a = rng.normal(size=(n, c, c))
    inv = a @ a.transpose(0, 2, 1) + np.eye(c)  # symmetric positive definite
    x = rng.normal(size=(b, c, n))
    expected = np.empty((b, n))
    for i in range(b):
        for j in range(n):
            d = x[i, :, j] - mean[:, j]
            expected[i, j] = np.sqrt(d @ inv[j] @ d)
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(inv))
    assert got.shape == (b, n)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_mahalanobis_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        mahalanobis(torch.zeros(1, 3, 4), torch.zeros(3, 5), torch.zeros(5, 3, 3))


# -- blur


def test_blur_default_kernel_size_and_same_output_size() -> None:
    assert GaussianBlur2d(sigma=4).kernel_size == 33
    assert GaussianBlur2d(sigma=1).kernel_size == 9
    x = torch.rand(2, 1, 40, 50)
    assert GaussianBlur2d(sigma=4)(x).shape == x.shape
    assert GaussianBlur2d(sigma=4)(torch.rand(1, 1, 5, 7)).shape == (1, 1, 5, 7)  # smaller than the kernel


def test_blur_preserves_constant_image() -> None:
    x = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(GaussianBlur2d(sigma=2, channels=3)(x), x)


def test_blur_preserves_sum_and_has_expected_width() -> None:
    sigma = 3.0
    x = torch.zeros(1, 1, 81, 81)
    x[0, 0, 40, 40] = 1.0
    y = GaussianBlur2d(sigma=sigma)(x)[0, 0].double()
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)
    coords = torch.arange(81, dtype=torch.float64) - 40
    var_x = float((y.sum(0) * coords**2).sum())
    assert var_x == pytest.approx(sigma**2, rel=0.02)
    assert int(y.argmax()) == 40 * 81 + 40


def test_blur_channels_are_independent() -> None:
    x = torch.zeros(1, 2, 21, 21)
    x[0, 0, 10, 10] = 1.0
    y = GaussianBlur2d(sigma=1.5, channels=2)(x)
    assert float(y[0, 1].abs().max()) == 0.0
    assert float(y[0, 0].sum()) == pytest.approx(1.0, abs=1e-5)


def test_mahalanobis_in_blocks_matches_one_block() -> None:
    gen = torch.Generator().manual_seed(0)
    c, n, b = 6, 50, 4
    a = torch.randn(n, c, c, generator=gen)
    inv = a @ a.transpose(1, 2) + torch.eye(c)
    mean, x = torch.randn(c, n, generator=gen), torch.randn(b, c, n, generator=gen)
    whole = mahalanobis(x, mean, inv, chunk_size=b * c * n)
    for chunk in (1, b * c * 7, b * c * 13 + 5):  # one position, blocks that divide n and that do not
        torch.testing.assert_close(mahalanobis(x, mean, inv, chunk_size=chunk), whole)
    gaussian = MultiVariateGaussian().fit(x)
    before = gaussian(x)
    gaussian.load_state_dict({**gaussian.state_dict(), "mean": gaussian.mean + 1})  # in place: same tensor
    assert not torch.allclose(gaussian(x), before)  # the cached transposed mean follows the new values


def test_mahalanobis_of_rows_of_many_heads_matches_each_head_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    c, n = 5, 30
    heads = [MultiVariateGaussian().fit(torch.randn(20, c, n, generator=gen) * (k + 1) + k) for k in range(3)]
    index = torch.tensor([2, 0, 0, 1, 2, 0])  # uneven groups, interleaved
    x = torch.randn(len(index), c, n, generator=gen)
    expected = torch.stack([heads[int(k)](x[i : i + 1])[0] for i, k in enumerate(index)])
    for chunk in (1, 3 * 3 * c * 7, 1 << 22):  # one position per block, blocks that do not divide n, one block
        torch.testing.assert_close(mahalanobis_heads(x, heads, index, chunk_size=chunk), expected)
    torch.testing.assert_close(mahalanobis_heads(x[:2], heads[:1], torch.zeros(2, dtype=torch.long)), heads[0](x[:2]))


@pytest.mark.parametrize("shape", [(2, 1, 40, 70), (2, 3, 20, 24)])
def test_blur_matmul_path_matches_the_convolutions(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    import oddeye.models.components.blur as blur_module

    blur, x = GaussianBlur2d(sigma=4, channels=shape[1]), torch.rand(shape)
    fast = blur(x)
    monkeypatch.setattr(blur_module, "MATMUL_MAX_SIZE", 0)
    torch.testing.assert_close(fast, blur(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("backbone", "indices"), [("efficientnet_lite0", (1, 3)), ("mobilenetv3_small_100", (2,))])
def test_features_only_stops_after_the_deepest_stage(backbone: str, indices: tuple[int, ...]) -> None:
    from oddeye.models.components.feature_extractor import run_features_only

    net = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=indices).eval()
    x = torch.rand(1, 3, 64, 64)
    calls: list[int] = []
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        expected = net(x)
        calls.clear()
        got = run_features_only(net, x)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert max(calls) + 1 == max(net._stage_out_idx) < len(net.blocks)
