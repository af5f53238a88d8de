"""What the config-driven commands (``fit``, ``run``) share: loading the config with ``--set``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oddeye.config import OddeyeConfig

EXIT_CONFIG = 2


def add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override one config field")


def load(args: argparse.Namespace) -> OddeyeConfig:
    """The config named on the command line, with ``--set`` overrides and ``{out}`` resolved."""
    from oddeye.config import load_config

    return resolve_out(load_config(args.config, args.set), getattr(args, "out", None))


def resolve_out(cfg: OddeyeConfig, out: str | None) -> OddeyeConfig:
    """Put the output folder into ``{out}`` of ``model.checkpoint`` (``oddeye run --out``; ``oddeye-out`` for fit).

    Lets a demo config keep its checkpoint beside its other results wherever ``--out`` points.
    """
    cfg.model.checkpoint = cfg.model.checkpoint.replace("{out}", str(out or "oddeye-out"))
    cfg.model.directory = cfg.model.directory.replace("{out}", str(out or "oddeye-out"))
    if cfg.model.default is not None:
        cfg.model.default = cfg.model.default.replace("{out}", str(out or "oddeye-out"))
    return cfg
