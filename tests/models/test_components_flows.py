"""The shared flow parts: invertible stacks, exact log-determinants, encodings, losses and maps."""

from __future__ import annotations

import math

import pytest
import torch

from oddeye.models.components.flows import (
    alternating_kernel_sizes,
    check_feature_sizes,
    conv_subnet,
    coupling_stack,
    fc_subnet,
    gaussian_log_prob,
    latent_log_likelihood,
    likelihood_map,
    nll_loss,
    positional_encoding_2d,
)


def _randomise(stack: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every trainable weight so the flow is far from its identity-like start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("permute_soft", [False, True])
def test_conv_stack_inverts(permute_soft: bool) -> None:
    torch.manual_seed(0)
    subnets = [conv_subnet(k, hidden_ratio=0.5) for k in alternating_kernel_sizes(4)]
    stack = coupling_stack([6, 5, 7], 4, subnets, affine_clamping=2.0, permute_soft=permute_soft)
    _randomise(stack)
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    stack = stack.double()
    z, log_jac = stack(x)
    assert z.shape == x.shape and log_jac.shape == (3,)
    back, back_jac = stack(z, rev=True)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(back_jac, -log_jac, atol=1e-4, rtol=1e-6)


def test_conditional_fc_stack_inverts() -> None:
    torch.manual_seed(0)
    stack = coupling_stack([10], 3, fc_subnet(), affine_clamping=1.9, condition_dims=[8]).double()
    _randomise(stack)
    x, c = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    z, _ = stack(x, c=[c])
    back, _ = stack(z, c=[c], rev=True)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)
    z_other, _ = stack(x, c=[c + 1])
    assert not torch.allclose(z, z_other)  # the condition matters


@pytest.mark.parametrize("conditional", [False, True])
def test_log_det_matches_autograd_fc(conditional: bool) -> None:
    torch.manual_seed(1)
    stack = coupling_stack([4], 3, fc_subnet(), affine_clamping=2.0, condition_dims=[4] if conditional else None)
    stack = stack.double()
    _randomise(stack, seed=1)
    x = torch.randn(1, 4, dtype=torch.float64)
    c = [torch.randn(1, 4, dtype=torch.float64)] if conditional else None
    _, log_jac = stack(x, c=c)
    jac = torch.autograd.functional.jacobian(lambda v: stack(v[None], c=c)[0][0], x[0])
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert float(sign) > 0
    torch.testing.assert_close(log_jac[0], logabsdet, atol=1e-8, rtol=1e-8)


def test_log_det_matches_autograd_conv() -> None:
    torch.manual_seed(2)
    stack = coupling_stack([3, 2, 2], 2, conv_subnet(3, 1.0), affine_clamping=2.0, permute_soft=True).double()
    _randomise(stack, seed=2)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    _, log_jac = stack(x)
    jac = torch.autograd.functional.jacobian(lambda v: stack(v.view(1, 3, 2, 2))[0].flatten(), x.flatten())
    # a soft permutation is orthogonal up to float32 rounding (FrEIA counts its log-det as 0)
    torch.testing.assert_close(log_jac[0], torch.linalg.slogdet(jac)[1], atol=1e-6, rtol=0)


def test_permutations_are_seeded_and_restore_numpy() -> None:
    import numpy as np

    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = coupling_stack([8], 2, fc_subnet(), seed=7)
    assert np.random.rand() == expected  # the global generator is untouched
    b = coupling_stack([8], 2, fc_subnet(), seed=7)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if "w_perm" in na:
            assert torch.equal(pa, pb) and not pa.requires_grad
    assert any("w_perm" in k for k in a.state_dict())  # kept in checkpoints


def test_global_affine_init_sets_the_start_scale() -> None:
    stack = coupling_stack([4], 1, fc_subnet(), global_affine_init=0.5)
    x = torch.randn(2, 4)
    block = stack.module_list[0]  # zero the coupling's output: only the global affine acts
    torch.nn.init.zeros_(block.subnet[-1].weight)
    torch.nn.init.zeros_(block.subnet[-1].bias)
    z, log_jac = stack(x)
    torch.testing.assert_close(z.abs().sort(1).values, (0.5 * x).abs().sort(1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_jac, torch.full((2,), 4 * math.log(0.5)), atol=1e-5, rtol=1e-5)


def test_bad_stack_arguments() -> None:
    with pytest.raises(ValueError, match="≥ 1"):
        coupling_stack([4], 0, fc_subnet())
    with pytest.raises(ValueError, match="2 subnet constructors for 3 blocks"):
        coupling_stack([4], 3, [fc_subnet(), fc_subnet()])
    with pytest.raises(ValueError, match="at least 2 channels"):
        coupling_stack([1, 4, 4], 1, conv_subnet())
    with pytest.raises(ValueError, match="clamping must be > 0"):
        coupling_stack([4], 1, fc_subnet(), affine_clamping=0)
    with pytest.raises(ValueError, match="kernel_size must be"):
        conv_subnet(2)
    with pytest.raises(ValueError, match="hidden_ratio"):
        conv_subnet(3, 0)


def test_subnets_and_kernel_sizes() -> None:
    assert alternating_kernel_sizes(4) == [3, 1, 3, 1]
    assert alternating_kernel_sizes(3, conv3x3_only=True) == [3, 3, 3]
    assert alternating_kernel_sizes(3, first=1) == [1, 3, 1]
    net = conv_subnet(3, hidden_ratio=0.5)(8, 16)
    assert net[0].out_channels == 4 and net[0].kernel_size == (3, 3)
    assert net(torch.zeros(1, 8, 5, 5)).shape == (1, 16, 5, 5)
    assert fc_subnet()(6, 10)[0].out_features == 12


def test_positional_encoding() -> None:
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    torch.testing.assert_close(pe[0], torch.sin(torch.arange(5.0)).expand(3, 5))  # x, lowest frequency
    torch.testing.assert_close(pe[4], torch.sin(torch.arange(3.0))[:, None].expand(3, 5))  # y
    torch.testing.assert_close(pe[1], torch.cos(torch.arange(5.0)).expand(3, 5))
    flat = pe.flatten(1).T  # every position has its own code
    assert torch.cdist(flat, flat).add(torch.eye(15) * 10).min() > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_log_prob_and_loss() -> None:
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    log_jac = torch.tensor([0.5, -1.0])
    expected = torch.tensor([-LOG2PI - 2.5 + 0.5, -LOG2PI - 1.0])
    torch.testing.assert_close(gaussian_log_prob(z, log_jac), expected)
    torch.testing.assert_close(nll_loss(z, log_jac), torch.tensor(((2.5 - 0.5) + 1.0) / 2))
    # per-scale latents add up; per_dimension divides by the total dimension
    parts = [z[:, :1], z[:, 1:]]
    torch.testing.assert_close(nll_loss(parts, log_jac), nll_loss(z, log_jac))
    torch.testing.assert_close(nll_loss(parts, log_jac, per_dimension=True), nll_loss(z, log_jac) / 2)


LOG2PI = math.log(2 * math.pi)


def test_likelihood_map() -> None:
    z_fine = torch.zeros(2, 4, 4, 4)
    z_fine[0, :, 1, 2] = 3.0  # one unlikely position in the first image
    z_coarse = torch.zeros(2, 4, 2, 2)
    lls = [latent_log_likelihood(z_fine), latent_log_likelihood(z_coarse)]
    assert lls[0].shape == (2, 4, 4) and float(lls[0][0, 1, 2]) == pytest.approx(-4.5)
    amap = likelihood_map(lls, (8, 8))
    assert amap.shape == (2, 8, 8)
    y, x = divmod(int(amap[0].argmax()), 8)
    assert (y // 2, x // 2) == (1, 2)
    torch.testing.assert_close(amap[1], torch.full((8, 8), -1.0))  # all likely: −mean(exp 0)
    assert float(likelihood_map(lls, (8, 8), aggregate="sum")[1, 0, 0]) == pytest.approx(-2.0)
    shifted = likelihood_map(lls, (8, 8), aggregate="prod", shift=[1.0, 1.0])
    assert float(shifted[1, 0, 0]) == pytest.approx(-math.exp(-2.0))
    with pytest.raises(ValueError, match="aggregate must be"):
        likelihood_map(lls, (8, 8), aggregate="max")


def test_feature_size_check() -> None:
    check_feature_sizes("fastflow", "resnet18", ["layer1"], [(1, 64, 8, 8)], (32, 32))
    with pytest.raises(ValueError, match=r"layer 'layer3' gives 1×1 .* at least 2×2"):
        check_feature_sizes("fastflow", "resnet18", ["layer1", "layer3"], [(1, 64, 8, 8), (1, 256, 1, 1)], (16, 16))


def _cross_scale(seed: int = 0) -> torch.nn.Module:
    from oddeye.models.components.cross_scale_flow import cross_scale_flow

    torch.manual_seed(seed)
    flow = cross_scale_flow([[4, 4, 4], [4, 2, 2], [4, 1, 1]], n_coupling_blocks=2, clamp=3.0, hidden_channels=8)
    flow = flow.double()
    _randomise(flow, seed)  # the gains start at 0 (identity): move them
    return flow


def test_cross_scale_flow_inverts() -> None:
    flow = _cross_scale()
    x = [torch.randn(3, 4, s, s, dtype=torch.float64) for s in (4, 2, 1)]
    z, log_jac = flow(x)
    assert [t.shape for t in z] == [t.shape for t in x] and log_jac.shape == (3,)
    back, back_jac = flow(z, rev=True)
    for a, b in zip(back, x, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(back_jac, -log_jac)


def test_cross_scale_flow_log_det_matches_autograd() -> None:
    flow = _cross_scale(seed=3)
    sizes = (4, 2, 1)
    x = [torch.randn(1, 4, s, s, dtype=torch.float64) for s in sizes]
    _, log_jac = flow(x)

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts, i = [], 0
        for s in sizes:
            parts.append(flat[i : i + 4 * s * s].view(1, 4, s, s))
            i += 4 * s * s
        return torch.cat([t.flatten() for t in flow(parts)[0]])

    jac = torch.autograd.functional.jacobian(f, torch.cat([t.flatten() for t in x]))
    torch.testing.assert_close(log_jac[0], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)


def test_cross_scale_flow_mixes_scales() -> None:
    flow = _cross_scale()
    x = [torch.randn(1, 4, s, s, dtype=torch.float64) for s in (4, 2, 1)]
    z0, _ = flow(x)
    x[2] = x[2] + 1.0  # change only the coarsest scale
    z1, _ = flow(x)
    assert not torch.allclose(z0[0], z1[0])  # the finest scale's latent sees it
