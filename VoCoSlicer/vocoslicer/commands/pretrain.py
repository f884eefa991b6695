"""``vocoslicer pretrain <method>``: self-supervised pretraining runs.

Each method registers itself from a ``vocoslicer/commands/_pretrain_<method>.py`` module exposing
``register(subparsers)``, so the VoCo and PUMIT families stay in separate files.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import vocoslicer.commands as pkg


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` command group."""
    p = sub.add_parser("pretrain", help="self-supervised pretraining (VoCo, PUMIT tokenizer, PUMIT MIM)")
    methods = p.add_subparsers(dest="method", metavar="<method>", parser_class=type(p))
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_pretrain_"):
            importlib.import_module(f"vocoslicer.commands.{info.name}").register(methods)
    p.set_defaults(func=lambda args: p.print_help() or 2)
