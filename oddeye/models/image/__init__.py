"""Image anomaly models, one module (or sub-package) each with an ``@register("name")`` class.

No list to edit: the registry imports a model's module by its name on first use (a module
named like the model, e.g. ``padim``), and every module here for ``list_models``.
"""
