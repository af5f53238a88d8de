"""``oddeye demo [--forever]``: fit on the synthetic camera, then stream it with injected anomalies."""

from __future__ import annotations

import argparse
from pathlib import Path

from oddeye.commands._config import add_set
from oddeye.commands.fit import fit_demo
from oddeye.commands.run import cmd_run

COMMAND = "demo"
HELP = "fit on the synthetic camera, then stream it with injected anomalies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forever", action="store_true", help="stream in real time until Ctrl-C")
    parser.add_argument("--out", default="oddeye-out", help="output folder (default ./oddeye-out)")
    add_set(parser)


def run(args: argparse.Namespace) -> int:
    return cmd_demo(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from oddeye.config import demo_config_path, load_config
    from oddeye.scorecard import Scorecard

    out = Path(args.out)
    overrides = [f"model.checkpoint={out / 'demo-padim.pt'}", *args.set]
    if args.forever:
        overrides = ["sources.0.num_frames=null", "sources.0.realtime=true", *overrides]
    cfg = load_config(demo_config_path(), overrides)
    print(f"oddeye demo: fitting {cfg.model.name} on {cfg.fit.max_frames} normal frames of the synthetic camera")
    cfg = fit_demo(cfg, lambda extra: load_config(demo_config_path(), [*overrides, *extra]))
    print(
        "oddeye demo: streaming the synthetic camera with injected anomalies"
        + (" (Ctrl-C stops)" if args.forever else "")
    )
    card = Scorecard()
    run_args = argparse.Namespace(out=str(out), max_frames=None, duration=None, idle_timeout=None)
    rc = cmd_run(cfg, run_args, extra_sinks=[card])
    print(card.report())
    snaps = sorted((out / "snapshots").rglob("*.jpg")) if (out / "snapshots").is_dir() else []
    print(f"oddeye demo: {len(snaps)} snapshot(s) under {out / 'snapshots'}; scores and alerts in {out}")
    return rc
