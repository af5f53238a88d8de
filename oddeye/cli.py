"""The ``oddeye`` command line: logging, the parser and error handling; each command is a
module of ``oddeye.commands`` (demo, fit, run, models, eval, export, data, publish, ...).

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
from collections.abc import Sequence

from oddeye.commands._config import EXIT_CONFIG

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy machine spinning
# threads stall each other (PaDiM's batched per-position inverses took 60 s instead of 0.1 s with 2 threads
# under load); the model actors set the same (pipeline.ingest_actor.ACTOR_ENV).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("oddeye")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray", "urllib3", "timm", "huggingface_hub", "filelock", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddeye", description="Anomaly detection on camera streams and Kafka topics.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True)
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
        if not m.name.startswith("_")
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
        for module in _command_modules():
            if args.command == module.COMMAND:
                return int(module.run(args))
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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
