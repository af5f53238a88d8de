"""The ``oddeye`` command line: demo, fit, run, models.

Imports of torch, Ray and the models happen inside the commands that need them, so that
``oddeye models`` and ``--help`` answer at once. Expected failures (a bad config, weights
that cannot be fetched offline, a missing path, no data) print one line with the fix and
exit 1 (2 for a config error); ``--debug`` shows their traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oddeye.config import OddeyeConfig
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
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
    p.add_argument(
        "--camera",
        action="append",
        metavar="ID",
        help="model.scope camera: refit only this camera's head (a new version; repeat for several)",
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


_EXPECTED_ERRORS = (
    ("oddeye.models.base", "CheckpointError"),
    ("oddeye.models.base", "FitError"),
    ("oddeye.models.components.feature_extractor", "WeightsUnavailableError"),
    ("oddeye.pipeline.runner", "PipelineError"),
    ("oddeye.sources.base", "SourceError"),
)


def is_expected_error(e: BaseException) -> bool:
    """A failure the user can fix (told in its message), as opposed to a bug.

    The classes are looked up only in modules already imported: an error raised by a module
    was imported with it, and the CLI never imports torch or Ray just to check.
    """
    if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return True
    for module, name in _EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "models":
            return cmd_models()
        if args.command == "demo":
            return cmd_demo(args)
        for module in _command_modules():
            if args.command == module.COMMAND:
                return int(module.run(args))
        from oddeye.config import load_config

        cfg = load_config(args.config, args.set)
        resolve_out(cfg, getattr(args, "out", None))
        if args.command == "fit":
            if cfg.model.scope == "camera" or args.camera:
                return cmd_fit_cameras(cfg, args.camera, args.data)
            return cmd_fit(cfg, args.data, config_path=args.config, overrides=args.set)
        if args.command == "run":
            return cmd_run(cfg, args)
    except KeyboardInterrupt:
        print("oddeye: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        config_error = getattr(sys.modules.get("oddeye.config"), "ConfigError", None)
        if config_error is not None and isinstance(e, config_error):
            print(f"oddeye: config error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        if not is_expected_error(e):
            raise
        print(f"oddeye: {_one_line(e)}", file=sys.stderr)
        return 1
    return 1


def resolve_out(cfg: OddeyeConfig, out: str | None) -> OddeyeConfig:
    """Put the output folder into ``{out}`` of ``model.checkpoint`` (``oddeye run --out``; ``oddeye-out`` for fit).

    Lets a demo config keep its checkpoint beside its other results wherever ``--out`` points.
    """
    cfg.model.checkpoint = cfg.model.checkpoint.replace("{out}", str(out or "oddeye-out"))
    cfg.model.directory = cfg.model.directory.replace("{out}", str(out or "oddeye-out"))
    if cfg.model.default is not None:
        cfg.model.default = cfg.model.default.replace("{out}", str(out or "oddeye-out"))
    return cfg


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


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

    root = Path(__file__).resolve().parent / "models"
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
