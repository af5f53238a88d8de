"""Normalizing-flow parts shared by FastFlow, CFLOW, CS-Flow and U-Flow, built on FrEIA.

- subnet constructors (conv 3×3, conv 1×1, alternating, fully connected) sized by ``hidden_ratio``;
- coupling-block stacks of FrEIA's ``AllInOneBlock`` (affine coupling with soft clamping,
  a soft or hard channel permutation and a global affine "ActNorm"), with a seeded permutation;
- the 2-D sinusoidal positional encoding that conditions CFLOW's flows;
- the Gaussian log-likelihood of latents and its negative, the training loss;
- likelihood → anomaly map: per-scale likelihoods upsampled to the image and aggregated;
- a check that a backbone's feature maps are large enough for a flow's scales.

The permutations are fixed ``nn.Parameter``s without gradient, so a checkpoint restores them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import FrEIA.framework as ff
import FrEIA.modules as fm
import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate

__all__ = [
    "LOG_2PI",
    "SubnetConstructor",
    "aggregate_maps",
    "alternating_kernel_sizes",
    "check_feature_sizes",
    "conv_subnet",
    "coupling_nodes",
    "coupling_stack",
    "fc_subnet",
    "feature_shapes",
    "gaussian_log_prob",
    "latent_log_likelihood",
    "likelihood_map",
    "nll_loss",
    "positional_encoding_2d",
    "seeded_numpy",
]

LOG_2PI = math.log(2 * math.pi)
SubnetConstructor = Callable[[int, int], nn.Module]
_AGGREGATIONS = ("mean", "sum", "prod")


# ----------------------------------------------------------------------------- subnets


def conv_subnet(kernel_size: int = 3, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """Coupling subnet conv(k) → ReLU → conv(k) with ``int(in_channels * hidden_ratio)`` hidden channels."""
    if kernel_size not in (1, 3, 5, 7):
        raise ValueError(f"kernel_size must be 1, 3, 5 or 7, got {kernel_size}")
    if not hidden_ratio > 0:
        raise ValueError(f"hidden_ratio must be > 0, got {hidden_ratio}")

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        pad = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=pad),
        )

    return build


def fc_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Coupling subnet linear → ReLU → linear on feature vectors (CFLOW's fibers)."""
    if not hidden_ratio > 0:
        raise ValueError(f"hidden_ratio must be > 0, got {hidden_ratio}")

    def build(in_features: int, out_features: int) -> nn.Module:
        hidden = max(1, int(in_features * hidden_ratio))
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    return build


def alternating_kernel_sizes(flow_steps: int, conv3x3_only: bool = False, first: int = 3) -> list[int]:
    """Kernel size per flow step: 3×3 and 1×1 in turn (starting with ``first``), or 3×3 throughout."""
    if flow_steps < 1:
        raise ValueError(f"flow_steps must be ≥ 1, got {flow_steps}")
    if conv3x3_only:
        return [3] * flow_steps
    other = 1 if first == 3 else 3
    return [first if i % 2 == 0 else other for i in range(flow_steps)]


# ----------------------------------------------------------------------------- coupling stacks


@contextlib.contextmanager
def seeded_numpy(seed: int | None) -> Iterator[None]:
    """Run a block with NumPy's global generator seeded, then restore it (FrEIA draws permutations from it)."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _block_kwargs(
    subnet: SubnetConstructor,
    affine_clamping: float,
    permute_soft: bool,
    global_affine_init: float,
    global_affine_type: str,
) -> dict:
    if not affine_clamping > 0:
        raise ValueError(f"affine clamping must be > 0, got {affine_clamping}")
    if global_affine_type not in ("SOFTPLUS", "SIGMOID", "EXP"):
        raise ValueError(f"global_affine_type must be SOFTPLUS, SIGMOID or EXP, got {global_affine_type!r}")
    return {
        "subnet_constructor": subnet,
        "affine_clamping": float(affine_clamping),
        "permute_soft": bool(permute_soft),
        "global_affine_init": float(global_affine_init),
        "global_affine_type": global_affine_type,
    }


def coupling_stack(
    dims: Sequence[int],
    n_blocks: int,
    subnet: SubnetConstructor | Sequence[SubnetConstructor],
    affine_clamping: float = 2.0,
    permute_soft: bool = False,
    global_affine_init: float = 1.0,
    global_affine_type: str = "SOFTPLUS",
    condition_dims: Sequence[int] | None = None,
    seed: int | None = 0,
) -> ff.SequenceINN:
    """``n_blocks`` AllInOneBlocks on inputs of shape ``dims`` ([C] or [C, H, W]).

    ``subnet`` is one constructor for every block or one per block (FastFlow alternates
    kernel sizes). ``condition_dims`` makes every block conditional on one extra input of
    that shape (CFLOW's positional encoding). ``seed`` fixes the random permutations.
    Call the result as ``z, log_jac_det = stack(x[, c=[cond]])``; ``rev=True`` inverts it.
    """
    if n_blocks < 1:
        raise ValueError(f"the number of coupling blocks must be ≥ 1, got {n_blocks}")
    subnets = [subnet] * n_blocks if callable(subnet) else list(subnet)
    if len(subnets) != n_blocks:
        raise ValueError(f"{len(subnets)} subnet constructors for {n_blocks} blocks")
    if dims[0] < 2:
        raise ValueError(f"a coupling block needs at least 2 channels to split, got {dims[0]}")
    stack = ff.SequenceINN(*[int(d) for d in dims])
    with seeded_numpy(seed):
        for sub in subnets:
            kwargs = _block_kwargs(sub, affine_clamping, permute_soft, global_affine_init, global_affine_type)
            if condition_dims is None:
                stack.append(fm.AllInOneBlock, **kwargs)
            else:
                stack.append(fm.AllInOneBlock, cond=0, cond_shape=tuple(int(d) for d in condition_dims), **kwargs)
    return stack


def coupling_nodes(
    in_node: ff.Node,
    subnets: Sequence[SubnetConstructor],
    affine_clamping: float = 2.0,
    permute_soft: bool = False,
    name: str = "flow",
) -> list[ff.Node]:
    """One AllInOneBlock node per subnet, chained after ``in_node``, for graph flows (U-Flow).

    Seed NumPy around the whole graph build (``seeded_numpy``) to fix the permutations.
    """
    nodes: list[ff.Node] = []
    for step, sub in enumerate(subnets):
        kwargs = _block_kwargs(sub, affine_clamping, permute_soft, 1.0, "SOFTPLUS")
        nodes.append(ff.Node(in_node, fm.AllInOneBlock, kwargs, name=f"{name}_step{step}"))
        in_node = nodes[-1]
    return nodes


# ----------------------------------------------------------------------------- conditioning


def positional_encoding_2d(condition_vector: int, height: int, width: int) -> torch.Tensor:
    """Sinusoidal encoding [condition_vector, height, width]: half the channels encode x, half y.

    Channels 2i/2i+1 of each half hold sin/cos of the position at frequency 10000^(-2i/d)
    (d = condition_vector / 2), as in the Transformer, so each fiber knows where it is.
    """
    if condition_vector <= 0 or condition_vector % 4:
        raise ValueError(f"condition_vector must be a positive multiple of 4, got {condition_vector}")
    half = condition_vector // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(1e4) / half))  # [half/2]
    xs = torch.arange(width, dtype=torch.float32)[None, :] * freq[:, None]  # [half/2, W]
    ys = torch.arange(height, dtype=torch.float32)[None, :] * freq[:, None]  # [half/2, H]
    out = torch.zeros(condition_vector, height, width)
    out[0:half:2] = torch.sin(xs)[:, None, :].expand(-1, height, -1)
    out[1:half:2] = torch.cos(xs)[:, None, :].expand(-1, height, -1)
    out[half::2] = torch.sin(ys)[:, :, None].expand(-1, -1, width)
    out[half + 1 :: 2] = torch.cos(ys)[:, :, None].expand(-1, -1, width)
    return out


# ----------------------------------------------------------------------------- likelihoods


def gaussian_log_prob(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """log p(x) per sample [B] under a standard normal latent: −D/2·log 2π − ½‖z‖² + log|det J|."""
    flat = z.flatten(1)
    return -0.5 * flat.shape[1] * LOG_2PI - 0.5 * flat.pow(2).sum(1) + log_jac_det


def nll_loss(
    latents: torch.Tensor | Sequence[torch.Tensor], log_jac_det: torch.Tensor, per_dimension: bool = False
) -> torch.Tensor:
    """Mean over the batch of ½‖z‖² − log|det J| (the negative log-likelihood up to its constant).

    ``latents`` may be one tensor or the per-scale outputs of one flow (their norms add up).
    ``per_dimension`` divides by the number of latent dimensions (CS-Flow's scale-free loss).
    """
    parts = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    sq = sum(p.flatten(1).pow(2).sum(1) for p in parts)
    loss = (0.5 * sq - log_jac_det).mean()
    if per_dimension:
        loss = loss / sum(p[0].numel() for p in parts)
    return loss


def latent_log_likelihood(z: torch.Tensor) -> torch.Tensor:
    """Per-position log-likelihood of a latent map [B, C, h, w] → [B, h, w]: −½ mean over channels of z²."""
    return -0.5 * z.pow(2).mean(dim=1)


def aggregate_maps(maps: Sequence[torch.Tensor], size: Sequence[int], aggregate: str = "mean") -> torch.Tensor:
    """Per-scale maps [B, h_i, w_i] → [B, H, W]: each upsampled bilinearly to ``size``, then mean, sum or product."""
    if aggregate not in _AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {_AGGREGATIONS}, got {aggregate!r}")
    if not maps:
        raise ValueError("at least one scale is needed")
    size = tuple(int(s) for s in size)
    stacked = torch.cat(
        [interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False) for m in maps], dim=1
    )
    if aggregate == "mean":
        return stacked.mean(dim=1)
    if aggregate == "sum":
        return stacked.sum(dim=1)
    return stacked.prod(dim=1)


def likelihood_map(
    log_likelihoods: Sequence[torch.Tensor],
    size: Sequence[int],
    aggregate: str = "mean",
    shift: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-scale log-likelihood maps [B, h_i, w_i] → one anomaly map [B, H, W] (higher = more anomalous).

    Each scale becomes a likelihood ``exp(ll - shift_i)`` (``shift`` keeps the exponent in
    range: e.g. the largest log-likelihood seen on normal data), is upsampled bilinearly to
    ``size`` and the scales are aggregated (``mean``, ``sum`` or ``prod``); the map is the
    negated aggregate, so unlikely positions score high.
    """
    probs = [torch.exp(ll if shift is None else ll - shift[i]) for i, ll in enumerate(log_likelihoods)]
    return -aggregate_maps(probs, size, aggregate)


# ----------------------------------------------------------------------------- input checks


@torch.no_grad()
def feature_shapes(extractor: nn.Module, image_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """[C, h, w] of each feature map the extractor gives for one image of ``image_size`` (a dry run)."""
    was_training = extractor.training
    extractor.eval()
    try:
        out = extractor(torch.zeros(1, 3, int(image_size[0]), int(image_size[1])))
    finally:
        extractor.train(was_training)
    maps = out.values() if isinstance(out, dict) else out
    return [tuple(int(d) for d in m.shape[1:]) for m in maps]


def check_feature_sizes(
    model: str,
    backbone: str,
    layers: Sequence[str],
    shapes: Sequence[Sequence[int]],
    image_size: Sequence[int],
    min_size: int = 2,
) -> None:
    """Raise a ValueError naming the layer when a feature map is smaller than ``min_size`` on a side."""
    for layer, shape in zip(layers, shapes, strict=True):
        h, w = int(shape[-2]), int(shape[-1])
        if h < min_size or w < min_size:
            raise ValueError(
                f"{model}: backbone {backbone!r} layer {layer!r} gives {h}×{w} feature maps for image_size "
                f"{tuple(image_size)}; the flow needs at least {min_size}×{min_size} at every scale. "
                "Use a larger image_size or earlier layers"
            )
