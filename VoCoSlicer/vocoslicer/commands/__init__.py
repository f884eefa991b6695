"""CLI subcommands. Each module here defines ``register(subparsers)``; :mod:`vocoslicer.cli` discovers them,
so adding a command never means editing a shared list. Heavy imports (torch, monai) belong inside the handler
functions so that ``--help`` stays instant.
"""
