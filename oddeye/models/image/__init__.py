"""Image anomaly models; importing this package imports every module in it, which registers them.

A new model is one module (or sub-package) here with an ``@register("name")`` class: no list to edit.
"""

import importlib
import pkgutil

__all__ = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]

for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")
