"""Video anomaly models; importing this package registers them."""

from oddeye.models.video import frame_diff

__all__ = ["frame_diff"]
