"""``oddeye run CONFIG [--out DIR] [--max-frames N] [--duration S] [--idle-timeout S]``: run a pipeline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oddeye.commands._config import add_set, load

if TYPE_CHECKING:
    from oddeye.config import OddeyeConfig
    from oddeye.sinks.base import Sink

COMMAND = "run"
HELP = "run the pipeline of a config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    add_set(parser)
    parser.add_argument("--out", default="oddeye-out", help="where file sinks write (default ./oddeye-out)")
    parser.add_argument("--max-frames", type=int, help="stop after N frames are scored")
    parser.add_argument("--duration", type=float, help="stop after S seconds")
    parser.add_argument(
        "--idle-timeout", type=float, help="stop after S seconds with no new input and nothing left to score"
    )


def run(args: argparse.Namespace) -> int:
    return cmd_run(load(args), args)


def cmd_run(cfg: OddeyeConfig, args: argparse.Namespace, extra_sinks: Sequence[Sink] = ()) -> int:
    from oddeye.pipeline.runner import Pipeline

    if cfg.model.scope == "pipeline" and cfg.fit.auto and not Path(cfg.model.checkpoint).is_file():
        from oddeye.pipeline.fit import fit_from_config

        print(f"oddeye: no model at {cfg.model.checkpoint} yet (fit.auto): fitting {cfg.model.name} first")
        fit_from_config(cfg)

    pipeline = Pipeline(
        cfg,
        out_dir=args.out,
        max_frames=args.max_frames,
        duration=args.duration,
        idle_timeout=args.idle_timeout,
        extra_sinks=extra_sinks,
    )
    pipeline.install_signal_handlers()
    try:
        s = pipeline.run()
    finally:
        pipeline.close()
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())) or "none"
    print(
        f"oddeye: {s.stop_reason}: {s.ingested} frames in, {s.scored} scored, {s.dead_letters} dead letters, "
        f"dropped {dropped}; {s.alerts_opened} alerts; {s.frames_per_s:.1f} frames/s; results in {args.out}"
    )
    return 0
