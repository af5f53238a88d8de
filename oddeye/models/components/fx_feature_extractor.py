"""Features from any node of a torchvision or timm model, traced with torch.fx.

Where ``TimmFeatureExtractor`` offers timm's feature stages, this one returns any
intermediate node (``"layer1"``, ``"features.6.8"``, ``"blocks.2.0.conv_pwl"`` ...), as
anomalib's ``TorchFXFeatureExtractor`` does. Node names come from
``torchvision.models.feature_extraction.get_graph_node_names``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from oddeye.models.components.feature_extractor import WeightsUnavailableError, read_state_dict

__all__ = ["TorchFXFeatureExtractor"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Parameter-name prefixes of classification heads, which a weights file may leave out.
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "last_linear.")


class TorchFXFeatureExtractor(nn.Module):
    """Returns ``{node: tensor}`` for images [B, 3, H, W] in [0, 1] (normalised inside when ``normalize``).

    ``backbone`` is a torchvision model name, a timm model name, or a module. ``weights``
    is ``None`` (random initialisation), a local state_dict file or directory (read
    safely, as for ``TimmFeatureExtractor``), or for torchvision models a weights enum
    or its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), fetched the usual torchvision way.
    The model is frozen unless ``requires_grad``.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        return_nodes: Sequence[str],
        weights: str | Path | WeightsEnum | None = None,
        requires_grad: bool = False,
        tracer_kwargs: dict[str, Any] | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(return_nodes, str):
            return_nodes = [return_nodes]
        if not return_nodes:
            raise ValueError("return_nodes must name at least one node")
        self.return_nodes = [str(n) for n in return_nodes]
        self.requires_grad = requires_grad
        self.normalize = normalize
        model, mean, std = _build_backbone(backbone, weights)
        try:
            self.feature_extractor = create_feature_extractor(
                model, return_nodes=self.return_nodes, tracer_kwargs=tracer_kwargs
            )
        except ValueError as e:
            _, nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
            modules = sorted({n.split(".")[0] for n in nodes})
            raise ValueError(
                f"{e}; the model's top-level nodes are {modules} "
                "(full names from torchvision.models.feature_extraction.get_graph_node_names)"
            ) from None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if not requires_grad:
            self.feature_extractor.requires_grad_(False)
            self.feature_extractor.eval()

    def train(self, mode: bool = True) -> TorchFXFeatureExtractor:
        """Keep a frozen backbone in eval mode (batch-norm statistics stay fixed)."""
        super().train(mode)
        if not self.requires_grad:
            self.feature_extractor.eval()
        return self

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.normalize:
            inputs = (inputs.to(self.mean.dtype) - self.mean) / self.std
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            features = self.feature_extractor(inputs)
        return {node: features[node] for node in self.return_nodes}

    @torch.no_grad()
    def dryrun(self, input_size: tuple[int, int] = (224, 224)) -> dict[str, tuple[int, ...]]:
        """Shape (without the batch dimension) of each returned node for one image of ``input_size``."""
        device = self.mean.device
        out = self.forward(torch.zeros(1, 3, *input_size, device=device))
        return {name: tuple(value.shape[1:]) for name, value in out.items()}


def _build_backbone(
    backbone: str | nn.Module, weights: str | Path | WeightsEnum | None
) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The model with its weights, and the input mean/std it expects."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    enum = None
    path = None
    if isinstance(weights, WeightsEnum):
        enum = weights
    elif weights is not None:
        if Path(weights).exists():
            path = Path(weights)
        elif isinstance(backbone, str) and backbone in torchvision.models.list_models():
            enum = _weights_enum(backbone, str(weights))
        else:
            raise FileNotFoundError(f"weights {weights!s} is not a file or directory")

    if isinstance(backbone, nn.Module):
        model = backbone
        if enum is not None:
            raise ValueError("a weights enum needs a torchvision model name as backbone, not a module")
    elif backbone in torchvision.models.list_models():
        model = _torchvision_model(backbone, enum)
    elif timm.is_model(backbone):
        if enum is not None:
            raise ValueError(f"timm backbone {backbone!r} takes a local weights path, not {weights!r}")
        model = timm.create_model(backbone, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
    else:
        raise ValueError(f"unknown backbone {backbone!r}: not a torchvision or timm model name")

    if path is not None:
        _load_local(model, path)
    return model.eval(), mean, std


def _weights_enum(backbone: str, name: str) -> WeightsEnum:
    enum_class = torchvision.models.get_model_weights(backbone)
    short = name.split(".")[-1]
    try:
        return enum_class[short]
    except KeyError:
        allowed = ["DEFAULT", *(w.name for w in enum_class)]
        raise ValueError(
            f"weights {name!r} is neither a local file nor a {enum_class.__name__} name; available: {allowed}"
        ) from None


def _torchvision_model(backbone: str, enum: WeightsEnum | None) -> nn.Module:
    if enum is None:
        return torchvision.models.get_model(backbone, weights=None)
    try:
        return torchvision.models.get_model(backbone, weights=enum)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsUnavailableError(
            f"torchvision weights {enum} for {backbone!r} could not be fetched ({reason}). "
            "On a machine without internet, set `weights: <local path>` to a state_dict file of the model."
        ) from e


def _load_local(model: nn.Module, path: Path) -> None:
    """Load a state_dict file into ``model``; a missing classifier head is allowed, nothing else."""
    state = read_state_dict(path)
    target = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in target if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: weights do not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=False)
    log.info("loaded backbone weights from %s", path)
