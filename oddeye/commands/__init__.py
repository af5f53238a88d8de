"""The ``oddeye`` subcommands, one module each, found by the CLI at start (``oddeye.cli``).

Each module here (not starting with ``_``: ``_config`` holds what ``fit`` and ``run`` share)
defines ``COMMAND`` (its name), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Imports of heavy dependencies belong inside ``run`` so
that ``oddeye --help`` and ``oddeye models`` stay fast.
"""
