"""Getting a fitted model ready to score as fast as the hardware allows, in one place.

``prepare_for_inference(model, device)`` is what a model actor (or ``oddeye eval``) calls
once after loading a checkpoint; afterwards ``model(images)`` is all it takes per batch.
It applies, where each one wins (measured in ``benchmarks/models_speed.py``):

- ``channels_last`` memory format for models with 2-D convolutions (1.5–1.8× for a CNN
  backbone on a 2-core AVX2 CPU);
- reduced precision (bf16 or fp16) for the *backbone only*: the feature extractor runs under
  autocast and hands float32 features to the head, so Gaussians, memory-bank distances and
  PCA stay in full precision. On by default on CPUs with native bf16 (AMX or AVX-512 BF16);
  off on other CPUs, where bf16 is emulated and slower, and off on CUDA, where an H100 ran
  EfficientNet-Lite0 at 256² no faster in bf16 than in float32 (whose convolutions already
  use TF32 tensor cores) and bf16 moved DFKDE's AUROC by 0.014–0.036 (benchmarks/RESULTS.md).
  ``model.precision: float16`` or ``bfloat16`` turns it on for larger backbones;
- batch norms folded into the convolutions before them (an inference copy of a frozen timm
  backbone, checked against the original on a probe batch; the backbone itself and the
  checkpoint keep the batch norms). Removes a memory-bound pass per convolution;
- ``torch.compile`` of the backbone, off by default (it costs a long warm-up per input
  shape and did not win on the CPU; see ``benchmarks/RESULTS.md``).

Nothing here changes the checkpoint: the settings (and the folded copy, which holds a second
set of backbone weights) live on the module instance only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "InferenceSettings",
    "backbone_modules",
    "cpu_has_native_bf16",
    "fold_batch_norms",
    "inference_settings",
    "prepare_for_inference",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags of native bf16 arithmetic: without them bf16 is emulated and slower than float32.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_SETTINGS_ATTR = "_oddeye_inference"
# A folded copy is kept only if it matches the original backbone this closely on the probe batch.
_FOLD_TOLERANCE = 1e-3


class InferenceSettings(dict):
    """What ``prepare_for_inference`` applied: device, channels_last, precision, compile, backbones."""


def cpu_has_native_bf16() -> bool:
    """True when the CPU does bf16 arithmetic in hardware (AMX or AVX-512 BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The feature-extractor modules of ``model`` (outermost only): what runs under reduced precision."""
    from oddeye.models.components import TimmFeatureExtractor, TorchFXFeatureExtractor

    kinds: tuple[type, ...] = (TimmFeatureExtractor, TorchFXFeatureExtractor)
    try:
        from oddeye.models.components.vit_features import ViTFeatureExtractor

        kinds = (*kinds, ViTFeatureExtractor)
    except ImportError:  # pragma: no cover - optional component
        pass
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, kinds) and not any(module in set(f.modules()) for f in found):
            found.append(module)
    return found


def _conv_bn_pairs(net: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the batch norm's input is exactly the conv's output
    and that output feeds no other module, found by a dry run on ``probe``."""
    names = {module: name for name, module in net.named_modules()}
    produced: dict[int, str] = {}  # id of a Conv2d output -> conv name
    consumers: dict[int, list[str]] = {}  # id of a module input -> module names
    keep: list[torch.Tensor] = []  # every tensor seen stays alive, so ids stay unique during the run
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                consumers.setdefault(id(arg), []).append(names[module])
                keep.append(arg)
        if isinstance(module, nn.Conv2d) and isinstance(out, torch.Tensor):
            produced[id(out)] = names[module]
            keep.append(out)

    for module in names:
        if (module is not net and not list(module.children())) or isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(probe)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(net.named_modules())
    pairs = []
    for tensor_id, conv in produced.items():
        users = consumers.get(tensor_id, [])
        if len(users) == 1 and isinstance(modules[users[0]], nn.BatchNorm2d):
            bn = modules[users[0]]
            if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
                pairs.append((conv, users[0]))
    return pairs


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _bn_tail(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a batch norm once its affine transform is folded away: timm's
    ``BatchNormAct2d`` keeps its dropout and activation, a plain one becomes the identity."""
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


@torch.no_grad()
def fold_batch_norms(net: nn.Module, probe: torch.Tensor) -> nn.Module | None:
    """An eval-mode copy of ``net`` with every batch norm that only reads a convolution's output
    folded into that convolution's weights and bias (its activation, if any, kept).

    Pairs are found by a dry run on ``probe``; the copy is returned only if its outputs match
    ``net``'s on ``probe`` (relative error below 1e-3), else None, as when nothing folds.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    pairs = _conv_bn_pairs(net, probe)
    if not pairs:
        return None
    folded = copy.deepcopy(net).eval()
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        if conv.weight.ndim == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last):
            fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
        _set_submodule(folded, conv_name, fused)
        _set_submodule(folded, bn_name, _bn_tail(bn))
    folded.requires_grad_(False)
    with _without_tf32():
        expected, got = net(probe), folded(probe)
    for a, b in zip(_flat(expected), _flat(got), strict=True):
        if a.shape != b.shape or float((a - b).abs().max()) > _FOLD_TOLERANCE * max(float(a.abs().max()), 1.0):
            log.warning("batch-norm folding changed the backbone's output; keeping the unfolded backbone")
            return None
    return folded


@contextlib.contextmanager
def _without_tf32() -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA while folding is checked: CUDA convolutions
    run in TF32 by default, whose rounding (1e-3) alone would fail the check on every GPU (seen on
    an H100: every fold was refused)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in _flat(item)]


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    if precision == "auto":  # CUDA: float32 (TF32 convolutions), measured no slower and exact
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    dtype = _DTYPES[precision]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision 'float16' is for CUDA devices; on the CPU use 'bfloat16' or 'float32'")
    return dtype


def _to_float32(out: Any) -> Any:
    """Cast the floating tensors of a backbone's output (tensor, dict, list, tuple) back to float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v) for v in out)
    return out


def _wrap_forward(module: nn.Module, dtype: torch.dtype | None, channels_last: bool, compiled: bool) -> None:
    """Replace ``module.forward`` on this instance: autocast while not training, channels_last input."""
    original: Callable[..., Any] = type(module).forward.__get__(module)
    inner = original
    if compiled:
        inner = torch.compile(original, dynamic=False)

    @functools.wraps(original)
    def forward(images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return original(images, *args, **kwargs)  # training keeps its own precision and layout
        if channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return inner(images, *args, **kwargs)
        with torch.autocast(images.device.type, dtype=dtype):
            out = inner(images, *args, **kwargs)
        return _to_float32(out)

    module.forward = forward  # type: ignore[method-assign]


def prepare_for_inference(
    model: nn.Module,
    device: torch.device | str | None = None,
    channels_last: bool | str = "auto",
    precision: str = "auto",
    compile: bool = False,
    fold_bn: bool = True,
) -> nn.Module:
    """Move ``model`` to ``device``, put it in eval mode and apply the speed-ups that win there.

    ``channels_last``: ``"auto"`` (on for models with 2-D convolutions), True or False.
    ``precision``: ``"auto"`` (bf16 on CPUs with native bf16, else float32; float32 on
    CUDA), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (CUDA only); it applies to the
    backbone only. ``compile``: ``torch.compile`` the backbone. ``fold_bn``: run frozen timm
    backbones through a copy with batch norms folded into the convolutions. Returns the same module,
    prepared in place; calling it again re-applies the new settings. Scores stay within
    bf16 rounding of float32 (benchmarks/RESULTS.md checks image AUROC moves < 0.005).
    """
    if channels_last not in ("auto", True, False):
        raise ValueError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
    dev = torch.device(device) if device is not None else _module_device(model)
    dtype = _resolve_precision(precision, dev)
    use_cl = _has_conv2d(model) if channels_last == "auto" else bool(channels_last)
    model.to(dev)
    model.eval()
    if use_cl:
        model.to(memory_format=torch.channels_last)
    backbones = backbone_modules(model)
    folded = 0
    for module in backbones:
        module.__dict__.pop("forward", None)  # undo an earlier preparation
        if hasattr(module, "set_inference_net"):
            module.set_inference_net(None)
            if fold_bn and not module.requires_grad:
                net = _folded_backbone(module, dev, use_cl)
                module.set_inference_net(net)
                folded += net is not None
        if dtype is not None or use_cl or compile:
            _wrap_forward(module, dtype, use_cl, compile)
    settings = InferenceSettings(
        device=str(dev),
        channels_last=use_cl,
        precision=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        compile=bool(compile),
        folded_batch_norms=folded,
        backbones=[type(m).__name__ for m in backbones],
    )
    object.__setattr__(model, _SETTINGS_ATTR, settings)
    log.info("inference settings for %s: %s", getattr(model, "name", type(model).__name__), dict(settings))
    return model


def _folded_backbone(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module | None:
    """The batch-norm-folded copy of a ``TimmFeatureExtractor``'s network, checked on a small probe."""
    net: nn.Module = module.feature_extractor  # type: ignore[assignment]
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        probe = probe.contiguous(memory_format=torch.channels_last)
    try:
        return fold_batch_norms(net, probe)
    except Exception as e:  # an unusual backbone: folding is an optimisation, never a failure
        log.warning("batch-norm folding skipped for %s: %s", type(net).__name__, e)
        return None


def inference_settings(model: nn.Module) -> InferenceSettings | None:
    """What ``prepare_for_inference`` applied to ``model`` (None if it was not prepared)."""
    return getattr(model, _SETTINGS_ATTR, None)


def _module_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
