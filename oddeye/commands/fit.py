"""``oddeye fit CONFIG [--data DIR] [--camera ID]``: learn normality from the config's fit data."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oddeye.commands._config import EXIT_CONFIG, add_set, load

if TYPE_CHECKING:
    from oddeye.config import OddeyeConfig

COMMAND = "fit"
HELP = "learn normality from the config's fit data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument(
        "--data",
        help="fit on this folder's normal images instead (a dataset category such as MVTec's <category>/, "
        "or a plain image folder); writes the category's checkpoint (model.checkpoint with -<category>)",
    )
    parser.add_argument(
        "--camera",
        action="append",
        metavar="ID",
        help="model.scope camera: refit only this camera's head (a new version; repeat for several)",
    )
    add_set(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    if cfg.model.scope == "camera" or args.camera:
        return cmd_fit_cameras(cfg, args.camera, args.data)
    return cmd_fit(cfg, args.data, config_path=args.config, overrides=args.set)


def cmd_fit(
    cfg: OddeyeConfig, data: str | None = None, config_path: str | None = None, overrides: Sequence[str] = ()
) -> int:
    from oddeye.config import load_config
    from oddeye.pipeline.fit import fit_from_config

    if config_path is not None and is_demo_config(config_path):
        cfg = fit_demo(cfg, lambda c: load_config(config_path, [*overrides, *c]), data=data)
        print(f"fitted {cfg.model.name} → {cfg.model.checkpoint}")
        return 0
    _, path = fit_from_config(cfg, data=data)
    print(f"fitted {cfg.model.name} → {path}")
    return 0


def cmd_fit_cameras(cfg: OddeyeConfig, cameras: Sequence[str] | None, data: str | None = None) -> int:
    """scope camera: one head per camera from its own frames (``--camera``: only those, as new versions)."""
    from oddeye.pipeline.fit import fit_camera_heads

    if cfg.model.scope != "camera":
        print("oddeye: --camera needs model.scope: camera (per-camera heads)", file=sys.stderr)
        return EXIT_CONFIG
    if data is not None:
        print("oddeye: --data fits one model; with model.scope: camera heads learn from each camera", file=sys.stderr)
        return EXIT_CONFIG
    for key, head in fit_camera_heads(cfg, cameras).items():
        print(f"fitted {cfg.model.name} head v{head.version} for {key} → {cfg.model.directory}")
    return 0


def is_demo_config(path: str | Path) -> bool:
    """True for the embedded demo config and copies of it (configs/demo.yaml)."""
    from oddeye.config import demo_config_path

    try:
        return Path(path).read_bytes() == demo_config_path().read_bytes()
    except OSError:
        return False


def fit_demo(cfg: OddeyeConfig, reload: typing.Callable[[list[str]], OddeyeConfig], data: str | None = None):
    """Fit the demo config; offline, go on with random features (and say so) instead of failing.

    ``reload(extra_overrides)`` rebuilds the config with more ``--set`` overrides. Returns the
    config that was fitted.
    """
    from oddeye.models.components.feature_extractor import WeightsUnavailableError
    from oddeye.pipeline.fit import fit_from_config

    try:
        fit_from_config(cfg, data=data)
        return cfg
    except WeightsUnavailableError:
        print(
            f"oddeye: warning: pretrained {cfg.model.params.get('backbone', '')} weights are not available here "
            "(no internet, and none in the local cache).\n"
            "oddeye: going on with randomly initialised features, which still catch the synthetic anomalies; "
            "set model.params.weights to a local checkpoint (or offline:efficientnet_lite0) for real ones.",
            file=sys.stderr,
        )
    cfg = reload(["model.params.pre_trained=false"])
    fit_from_config(cfg, data=data)
    return cfg
