"""Image anomaly models; importing this package registers them."""

from oddeye.models.image import cfa, dfkde, dfm, padim, patchcore

__all__ = ["cfa", "dfkde", "dfm", "padim", "patchcore"]
