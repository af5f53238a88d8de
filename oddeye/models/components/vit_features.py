"""Patch tokens from a timm vision transformer (ViT, DINOv2, EVA, CLIP image towers) as feature grids.

Blocks are picked by number, counted from 1 as in anomalib's GeneralAD (``layers=(24,)`` is
the last block of a 24-block ViT-L). The class and register tokens are dropped and the
patch tokens come back as a grid [B, C, H / patch, W / patch]. Any input size that is a
multiple of the patch size works (position embeddings are resampled by timm). Weights load
the way the CNN extractor loads them: from the hub, or from a local file (``weights``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from oddeye.models.components import offline_weights
from oddeye.models.components.feature_extractor import _create_pretrained, _load_local_weights

__all__ = ["ViTFeatureExtractor", "is_vit"]

log = logging.getLogger(__name__)


def _probe(backbone: str, **kwargs: Any) -> nn.Module:
    if not timm.is_model(backbone):
        raise ValueError(f"unknown backbone {backbone!r}; see timm.list_models() for the available names")
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False, **kwargs)


def is_vit(backbone: str) -> bool:
    """Is ``backbone`` a timm transformer with patch tokens (``patch_embed`` and ``blocks``)?"""
    return _has_patch_tokens(_probe(backbone))


def _has_patch_tokens(probe: nn.Module) -> bool:
    return hasattr(probe, "patch_embed") and hasattr(probe, "blocks") and hasattr(probe, "forward_intermediates")


class ViTFeatureExtractor(nn.Module):
    """Returns ``{block: patch-token grid [B, C, h, w]}`` for images [B, 3, H, W] in [0, 1].

    The backbone's own mean/std normalisation happens inside. ``class_attention`` gives the
    class token's attention over the patches in the last requested block (per head), which
    GeneralAD uses to pick the patches it distorts.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int],
        image_size: tuple[int, int] | list[int] = (224, 224),
        pre_trained: bool = True,
        weights: str | None = None,
        requires_grad: bool = False,
        weights_key_map: str | Sequence[Sequence[str]] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """``weights``: a local state_dict file or directory, as for ``TimmFeatureExtractor``.

        ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"depth": 2}`` for a small random test network).
        """
        super().__init__()
        if isinstance(layers, int):
            layers = [layers]
        if not layers:
            raise ValueError("layers must name at least one transformer block (counted from 1)")
        self.backbone_name = backbone
        self.image_size = (int(image_size[0]), int(image_size[1]))
        model_kwargs = dict(model_kwargs or {})
        probe = _probe(backbone, **model_kwargs)
        if not _has_patch_tokens(probe):
            raise ValueError(
                f"backbone {backbone!r} is not a vision transformer with patch tokens; "
                "use a timm ViT/DINOv2/EVA/CLIP name (e.g. vit_small_patch14_dinov2) or a CNN feature extractor"
            )
        depth = len(probe.blocks)
        self.layers = [int(layer) for layer in layers]
        bad = [layer for layer in self.layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(f"layers {bad} out of range: {backbone!r} has blocks 1..{depth}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} name the same block twice")
        patch = probe.patch_embed.patch_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        check_patch_multiple(self.image_size, self.patch_size, backbone)
        self.requires_grad = requires_grad
        kwargs = {"num_classes": 0, "img_size": self.image_size, "dynamic_img_size": True, **model_kwargs}
        if weights is not None:
            path = Path(weights)
            if str(weights).startswith(offline_weights.OFFLINE_PREFIX):
                path, default_map = offline_weights.resolve(str(weights), backbone)
                weights_key_map = weights_key_map if weights_key_map is not None else default_map
            self.model = timm.create_model(backbone, pretrained=False, **kwargs)
            _load_local_weights(self.model, backbone, path, weights_key_map, adapt=self._adapt_state)
        elif pre_trained:
            self.model = _create_pretrained(backbone, **kwargs)
        else:
            self.model = timm.create_model(backbone, pretrained=False, **kwargs)

        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        self.embed_dim = int(self.model.embed_dim)
        self.out_channels = [self.embed_dim] * len(self.layers)

        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if not requires_grad:
            self.model.requires_grad_(False)
            self.model.eval()

    def _adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm's own checkpoint filter: original DINOv2/CLIP/EVA layouts, position embeddings resampled."""
        import sys

        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is None:
            return state
        # The filter expects a head-less network to be fed head-less weights; heads are ignored later.
        return filter_fn(state, self.model)

    def train(self, mode: bool = True) -> ViTFeatureExtractor:
        """Keep a frozen backbone in eval mode (no dropout, no drop-path)."""
        super().train(mode)
        if not self.requires_grad:
            self.model.eval()
        return self

    @property
    def supports_class_attention(self) -> bool:
        """Whether ``class_attention`` can be computed: a class token and timm's plain ``Attention`` (ViT,
        DINOv2, CLIP towers). EVA's rotary attention is not reproduced here."""
        from timm.layers import Attention

        attn = self.model.blocks[self.layers[-1] - 1].attn
        return getattr(self.model, "cls_token", None) is not None and type(attn) is Attention

    def forward(self, images: torch.Tensor, norm: bool = False) -> dict[int, torch.Tensor]:
        return self.forward_with_attention(images, attention=False, norm=norm)[0]

    def forward_with_attention(
        self, images: torch.Tensor, attention: bool = True, norm: bool = False
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Patch-token grids per block and (with ``attention``) class attention [B, heads, h * w].

        ``norm`` passes each block's tokens through the network's final norm layer (as GeneralAD does).
        """
        check_patch_multiple(tuple(images.shape[-2:]), self.patch_size, self.backbone_name)
        images = (images.to(self.mean.dtype) - self.mean) / self.std
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if attention:
            if not self.supports_class_attention:
                raise ValueError(f"backbone {self.backbone_name!r} gives no class-token attention map")
            attn = self.model.blocks[self.layers[-1] - 1].attn
            handle = attn.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
        try:
            with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
                grids = self.model.forward_intermediates(
                    images,
                    indices=[layer - 1 for layer in self.layers],
                    norm=norm,
                    output_fmt="NCHW",
                    intermediates_only=True,
                    stop_early=True,
                )
        finally:
            if handle is not None:
                handle.remove()
        features = dict(zip(self.layers, grids, strict=True))
        cls_attn = self._class_attention(captured["x"]) if attention else None
        return features, cls_attn

    @torch.no_grad()
    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the class token over the patch tokens, from the block's (normed) input."""
        attn = self.model.blocks[self.layers[-1] - 1].attn
        b, n, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, heads, 1, N]
        return weights[:, :, 0, self.num_prefix_tokens :]


def check_patch_multiple(size: Sequence[int], patch: Sequence[int], backbone: str) -> None:
    """A clear error when an input size is not a multiple of the ViT's patch size."""
    h, w = int(size[0]), int(size[1])
    if h % patch[0] or w % patch[1] or h <= 0 or w <= 0:
        ph, pw = int(patch[0]), int(patch[1])
        raise ValueError(
            f"image size {(h, w)} is not a multiple of {backbone!r}'s patch size {(ph, pw)}; "
            f"use e.g. {(max(1, round(h / ph)) * ph, max(1, round(w / pw)) * pw)}"
        )
