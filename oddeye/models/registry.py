"""The model registry: ``@register("padim")`` on a class, ``create_model(name, **params)`` to build one.

Kept apart from ``base.py`` so that models import the registry and the base class without
either importing the model packages (which is what ``list_models`` does to fill it).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

__all__ = ["create_model", "describe", "get_model_class", "list_models", "model_params", "register"]

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a model available by name (``@register("padim")``)."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return deco


_PACKAGES = ("oddeye.models.image", "oddeye.models.video")
_all_loaded = False


def _load_builtin_models() -> None:
    """Import every model module of the built-in packages (their ``@register`` decorators run)."""
    global _all_loaded
    if _all_loaded:
        return
    for package in _PACKAGES:
        pkg = importlib.import_module(package)
        for m in pkgutil.iter_modules(pkg.__path__):
            if not m.name.startswith("_"):
                importlib.import_module(f"{package}.{m.name}")
    _all_loaded = True


def _load_model_module(name: str) -> None:
    """Import only the module named like the model (``padim`` → ``oddeye.models.image.padim``), when there
    is one: a model actor then loads its own model's dependencies, not the whole zoo (timm, FrEIA,
    open_clip ... cost seconds of start-up per actor)."""
    for package in _PACKAGES:
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            importlib.import_module(f"{package}.{name}")
            return


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_builtin_models()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    if name not in _REGISTRY and name.isidentifier():
        _load_model_module(name)
    if name not in _REGISTRY:
        _load_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def model_params(name: str) -> dict[str, Any]:
    """Constructor parameters of a model and their defaults (``inspect.Parameter.empty`` if required)."""
    sig = inspect.signature(get_model_class(name).__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def create_model(name: str, **params: Any) -> Any:
    """Build a model by registered name with anomalib's parameter names."""
    cls = get_model_class(name)
    allowed = model_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"model {name!r} has no parameter(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**params)


def describe(name: str) -> tuple[str, str]:
    """(kind, one plain line) for ``oddeye models``: kind is ``image`` or ``video``.

    The line is the first sentence of the class docstring with reST/Markdown markup removed.
    """
    cls = get_model_class(name)
    kind = "video" if getattr(cls, "is_video", False) else "image"
    doc = inspect.getdoc(cls) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    for mark in ("``", "**", "`", "*"):
        first = first.replace(mark, "")
    return kind, first
