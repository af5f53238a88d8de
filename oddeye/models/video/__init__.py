"""Video anomaly models; importing this package imports every module in it, which registers them."""

import importlib
import pkgutil

__all__ = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]

for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")
