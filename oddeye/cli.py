"""The ``oddeye`` command line: demo, fit, run, models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from oddeye.config import ConfigError, OddeyeConfig, demo_config_path, load_config
from oddeye.frames import ScoredFrame
from oddeye.sinks.base import Sink

log = logging.getLogger("oddeye")

EXIT_CONFIG = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray", "urllib3", "timm", "huggingface_hub", "filelock", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="oddeye-out", help="where file sinks write (default ./oddeye-out)")
    p.add_argument("--max-frames", type=int, help="stop after N frames are scored")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--idle-timeout", type=float, help="stop after S seconds with no new input")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override one config field")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddeye", description="Anomaly detection on camera streams and Kafka topics.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fit on the synthetic camera, then stream it with injected anomalies")
    p.add_argument("--forever", action="store_true", help="stream in real time until Ctrl-C")
    p.add_argument("--out", default="oddeye-out", help="output folder (default ./oddeye-out)")
    _add_set(p)

    p = sub.add_parser("fit", help="learn normality from the config's fit data")
    p.add_argument("config")
    p.add_argument(
        "--data",
        help="fit on this folder's normal images instead (a dataset category such as MVTec's <category>/, "
        "or a plain image folder); writes the category's checkpoint (model.checkpoint with -<category>)",
    )
    _add_set(p)

    p = sub.add_parser("run", help="run the pipeline of a config")
    p.add_argument("config")
    _add_set(p)
    _add_run_args(p)

    sub.add_parser("models", help="list registered models")
    for module in _command_modules():
        module.add_arguments(sub.add_parser(module.COMMAND, help=module.HELP))
    return parser


def _command_modules() -> list:
    import importlib
    import pkgutil

    import oddeye.commands

    return [
        importlib.import_module(f"oddeye.commands.{m.name}")
        for m in sorted(pkgutil.iter_modules(oddeye.commands.__path__), key=lambda m: m.name)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from oddeye.models.base import CheckpointError, FitError
    from oddeye.pipeline.runner import PipelineError

    try:
        if args.command == "models":
            return cmd_models()
        if args.command == "demo":
            return cmd_demo(args)
        for module in _command_modules():
            if args.command == module.COMMAND:
                return int(module.run(args))
        cfg = load_config(args.config, args.set)
        if args.command == "fit":
            return cmd_fit(cfg, args.data)
        if args.command == "run":
            return cmd_run(cfg, args)
    except ConfigError as e:
        print(f"oddeye: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (PipelineError, FitError, CheckpointError, FileNotFoundError) as e:
        print(f"oddeye: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oddeye: interrupted", file=sys.stderr)
        return 130
    return 1


def cmd_models() -> int:
    from oddeye.models.registry import describe, list_models

    for name in list_models():
        kind, line = describe(name)
        print(f"{name}\t{kind}\t{line}")
    return 0


def cmd_fit(cfg: OddeyeConfig, data: str | None = None) -> int:
    from oddeye.pipeline.fit import fit_from_config

    _, path = fit_from_config(cfg, data=data)
    print(f"fitted {cfg.model.name} → {path}")
    return 0


def cmd_run(cfg: OddeyeConfig, args: argparse.Namespace, extra_sinks: Sequence[Sink] = ()) -> int:
    from oddeye.pipeline.runner import Pipeline

    if cfg.fit.auto and not Path(cfg.model.checkpoint).is_file():
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


def cmd_demo(args: argparse.Namespace) -> int:
    from oddeye.models.components.feature_extractor import WeightsUnavailableError
    from oddeye.pipeline.fit import fit_from_config

    out = Path(args.out)
    overrides = [f"model.checkpoint={out / 'demo-padim.pt'}", *args.set]
    if args.forever:
        overrides = ["sources.0.num_frames=null", "sources.0.realtime=true", *overrides]
    cfg = load_config(demo_config_path(), overrides)
    print(f"oddeye demo: fitting {cfg.model.name} on {cfg.fit.max_frames} normal frames of the synthetic camera")
    try:
        fit_from_config(cfg)
    except WeightsUnavailableError:
        print(
            f"oddeye demo: pretrained {cfg.model.params.get('backbone', '')} weights are not available here "
            "(no internet, and none in the local cache).\n"
            "oddeye demo: going on with randomly initialised features, which still catch the synthetic anomalies; "
            "set model.params.weights to a local checkpoint for real ones.",
            file=sys.stderr,
        )
        cfg = load_config(demo_config_path(), [*overrides, "model.params.pre_trained=false"])
        fit_from_config(cfg)
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


class Scorecard(Sink):
    """Compares alerts with the synthetic camera's ground truth, for the demo's closing lines."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, int]] = {}
        self.normal = 0
        self.normal_flagged = 0

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        for f in frames:
            if f.meta.get("anomaly"):
                p = self.kinds.setdefault(f.meta.get("kind") or "?", {"frames": 0, "flagged": 0})
                p["frames"] += 1
                p["flagged"] += int(f.label)
            else:
                self.normal += 1
                self.normal_flagged += int(f.label)

    def report(self) -> str:
        lines = ["oddeye demo: injected anomalies vs. scores (frames at or above the threshold):"]
        for kind, p in self.kinds.items():
            lines.append(f"  {kind:<15} {p['flagged']:>3}/{p['frames']} frames flagged")
        if self.normal:
            lines.append(f"  {'normal':<15} {self.normal_flagged:>3}/{self.normal} frames flagged (false positives)")
        return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
