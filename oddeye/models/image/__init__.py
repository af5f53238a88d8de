"""Image anomaly models; importing this package registers them."""

from oddeye.models.image import padim

__all__ = ["padim"]
