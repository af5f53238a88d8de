"""The registry loads a model's own module on first use, and every model for ``list_models``."""

from __future__ import annotations

import subprocess
import sys


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this one has imported every model already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout


def test_a_model_by_name_imports_only_its_own_dependencies() -> None:
    out = _fresh(
        "import sys\n"
        "from oddeye.models.registry import create_model\n"
        "m = create_model('null', image_size=[32, 32])\n"
        "print(m.name, 'FrEIA' in sys.modules, 'timm' in sys.modules, 'oddeye.models.image.padim' in sys.modules)\n"
    )
    assert out.split() == ["null", "False", "False", "False"]


def test_list_models_and_unknown_names_see_the_whole_zoo() -> None:
    out = _fresh(
        "from oddeye.models.registry import get_model_class, list_models\n"
        "names = list_models()\n"
        "print(len(names), 'padim' in names, 'ai_vad' in names, get_model_class('ai_vad').is_video)\n"
        "try:\n"
        "    get_model_class('no_such_model')\n"
        "except KeyError as e:\n"
        "    print('padim' in str(e))\n"
    )
    count, padim, ai_vad, video, listed = out.split()
    assert int(count) >= 20 and padim == ai_vad == video == listed == "True"
