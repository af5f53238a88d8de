"""Getting a fitted model ready to score as fast as the hardware allows, in one place.

``prepare_for_inference(model, device)`` is what a model actor (or ``oddeye eval``) calls
once after loading a checkpoint; afterwards ``model(images)`` is all it takes per batch.
It applies, where each one wins (measured in ``benchmarks/models_speed.py``):

- ``channels_last`` memory format for models with 2-D convolutions (1.5–1.8× for a CNN
  backbone on a 2-core AVX2 CPU);
- reduced precision (bf16, or fp16 on CUDA GPUs without bf16) for the *backbone only*:
  the feature extractor runs under autocast and hands float32 features to the head, so
  Gaussians, memory-bank distances and PCA stay in full precision. On by default on CUDA
  and on CPUs with native bf16 (AMX or AVX-512 BF16); off on other CPUs, where bf16 is
  emulated and slower;
- ``torch.compile`` of the backbone, off by default (it costs a long warm-up per input
  shape and did not win on the CPU; see ``benchmarks/RESULTS.md``).

Nothing here changes the checkpoint: the settings live on the module instance only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "InferenceSettings",
    "backbone_modules",
    "cpu_has_native_bf16",
    "inference_settings",
    "prepare_for_inference",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags of native bf16 arithmetic: without them bf16 is emulated and slower than float32.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_SETTINGS_ATTR = "_oddeye_inference"


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


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
) -> nn.Module:
    """Move ``model`` to ``device``, put it in eval mode and apply the speed-ups that win there.

    ``channels_last``: ``"auto"`` (on for models with 2-D convolutions), True or False.
    ``precision``: ``"auto"`` (bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else
    float32), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (CUDA only); it applies to the
    backbone only. ``compile``: ``torch.compile`` the backbone. Returns the same module,
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
    for module in backbones:
        module.__dict__.pop("forward", None)  # undo an earlier preparation
        if dtype is not None or use_cl or compile:
            _wrap_forward(module, dtype, use_cl, compile)
    settings = InferenceSettings(
        device=str(dev),
        channels_last=use_cl,
        precision=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        compile=bool(compile),
        backbones=[type(m).__name__ for m in backbones],
    )
    object.__setattr__(model, _SETTINGS_ATTR, settings)
    log.info("inference settings for %s: %s", getattr(model, "name", type(model).__name__), dict(settings))
    return model


def inference_settings(model: nn.Module) -> InferenceSettings | None:
    """What ``prepare_for_inference`` applied to ``model`` (None if it was not prepared)."""
    return getattr(model, _SETTINGS_ATTR, None)


def _module_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
