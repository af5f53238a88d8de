"""``oddeye models``: name, kind (image/video) and one plain line per registered model."""

from __future__ import annotations

import argparse
from pathlib import Path

COMMAND = "models"
HELP = "list registered models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    return cmd_models()


def cmd_models() -> int:
    """Name, kind and one line per model, read from the model modules' source (no torch import)."""
    for name, kind, line in builtin_models():
        print(f"{name}\t{kind}\t{line}")
    return 0


def builtin_models() -> list[tuple[str, str, str]]:
    """(name, kind, first docstring sentence) of every ``@register``-ed class under oddeye/models/{image,video}.

    Parsed with ``ast`` instead of imported, which takes seconds (torch, timm); falls back to the
    registry when a class is not plain enough to read that way (no docstring of its own).
    """
    import ast

    root = Path(__file__).resolve().parents[1] / "models"
    found: dict[str, tuple[str, str]] = {}
    for package in ("image", "video"):
        for path in sorted((root / package).rglob("*.py")):
            if any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                return _registry_models()
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef):
                    continue
                for deco in node.decorator_list:
                    if not (
                        isinstance(deco, ast.Call)
                        and (getattr(deco.func, "id", None) or getattr(deco.func, "attr", None)) == "register"
                    ):
                        continue
                    if not (
                        deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)
                    ):
                        return _registry_models()
                    doc = ast.get_docstring(node)
                    if not doc:
                        return _registry_models()
                    bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                    kind = "video" if package == "video" or "VideoAnomalyModel" in bases else "image"
                    found[deco.args[0].value] = (kind, plain_first_sentence(doc))
    if not found:
        return _registry_models()
    return [(name, *found[name]) for name in sorted(found)]


def plain_first_sentence(doc: str) -> str:
    """The first paragraph of a docstring on one line, without reST/Markdown markup."""
    first = " ".join(doc.split("\n\n")[0].split())
    for mark in ("``", "**", "`", "*"):
        first = first.replace(mark, "")
    return first


def _registry_models() -> list[tuple[str, str, str]]:
    from oddeye.models.registry import describe, list_models

    return [(name, *describe(name)) for name in list_models()]
