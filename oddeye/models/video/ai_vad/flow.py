"""Dense optical flow between the first and last frame of a clip, at the last frame's pixels.

Regions are found in the last frame, so the flow is wanted where objects are *now*: it is
computed backwards (last → first) and negated, which gives each last-frame pixel the
displacement that brought it there. (Forward flow would describe the first frame's
pixels: for a fast object the background it left, not the object.)

Backends: ``raft`` / ``raft_small`` (torchvision RAFT large / small; pretrained weights)
and ``farneback`` / ``dis`` (OpenCV, no weights, CPU). All return the displacement of
every pixel, [B, 2, H, W] (dx, dy) in pixels of the input frames.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate

from oddeye.models.components.motion import to_gray
from oddeye.models.video.ai_vad.weights import build_torchvision

__all__ = ["FLOW_BACKENDS", "FlowExtractor"]

FLOW_BACKENDS = ("raft", "raft_small", "farneback", "dis")


class FlowExtractor(nn.Module):
    """Optical flow [B, 2, H, W] from first to last frames [B, 3, H, W] in [0, 1]."""

    def __init__(self, backend: str = "raft", pre_trained: bool = True, weights: str | None = None) -> None:
        super().__init__()
        if backend not in FLOW_BACKENDS:
            raise ValueError(f"unknown flow backend {backend!r}; available: {list(FLOW_BACKENDS)}")
        self.backend = backend
        self.raft: nn.Module | None = None
        self._dis: cv2.DISOpticalFlow | None = None
        if backend in ("raft", "raft_small"):
            from torchvision.models import optical_flow as of

            builder, default = (
                (of.raft_large, of.Raft_Large_Weights.DEFAULT)
                if backend == "raft"
                else (of.raft_small, of.Raft_Small_Weights.DEFAULT)
            )
            self.raft = build_torchvision(builder, default, "flow", pre_trained, weights)

    def train(self, mode: bool = True) -> FlowExtractor:
        """The flow network is frozen: it stays in eval mode."""
        super().train(mode)
        if self.raft is not None:
            self.raft.eval()
        return self

    @torch.no_grad()
    def forward(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> torch.Tensor:
        if self.raft is not None:
            return self._raft(first_frame, last_frame)
        # Backwards (last → first), negated: the motion of what is at each last-frame pixel.
        first = to_gray(first_frame).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        last = to_gray(last_frame).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        flows = [self._opencv(b, a) for a, b in zip(first, last, strict=True)]
        return -torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).to(last_frame.device)

    def _opencv(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        if self.backend == "farneback":
            return cv2.calcOpticalFlowFarneback(first, last, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        if self._dis is None:  # built lazily: OpenCV objects do not pickle
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            # Down to full resolution: small objects (a person of 10 px) vanish at half.
            self._dis.setFinestScale(0)
        return self._dis.calc(first, last, None)

    def _raft(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> torch.Tensor:
        """RAFT at the input size rounded up to a multiple of 8, flow scaled back to the input."""
        assert self.raft is not None
        h, w = last_frame.shape[-2:]
        # RAFT's correlation pyramid needs at least 128 pixels a side.
        hh, ww = max(128, math.ceil(h / 8) * 8), max(128, math.ceil(w / 8) * 8)
        a, b = (
            interpolate(x, (hh, ww), mode="bilinear", align_corners=False) * 2 - 1 for x in (first_frame, last_frame)
        )
        flow = -self.raft(b.contiguous(), a.contiguous())[-1]
        flow = interpolate(flow, (h, w), mode="bilinear", align_corners=False)
        scale = torch.tensor([w / ww, h / hh], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
        return flow * scale
