"""Extra ``oddeye`` subcommands, found by the CLI at start.

Each module here defines ``COMMAND`` (its name), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Imports of heavy
dependencies belong inside ``run`` so that ``oddeye --help`` stays fast.
"""
