"""Video anomaly models; importing this package registers them."""

from oddeye.models.video import ai_vad, frame_diff

__all__ = ["ai_vad", "frame_diff"]
