"""``vocoslicer pretrain <method>``: self-supervised pretraining runs (VoCo v2, PUMIT tokenizer, PUMIT MIM).

One module per method (:mod:`.voco`, :mod:`.tokenizer`, :mod:`.mim`), registered by name below so that the group
is what this file says, not whatever files happen to lie in the folder; what they share is in :mod:`.common`.
"""

from __future__ import annotations

import argparse

from vocoslicer.commands.pretrain import mim, tokenizer, voco

METHODS = (voco, tokenizer, mim)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` command group."""
    p = sub.add_parser("pretrain", help="self-supervised pretraining (VoCo, PUMIT tokenizer, PUMIT MIM)")
    methods = p.add_subparsers(dest="method", metavar="<method>", parser_class=type(p))
    for method in METHODS:
        method.register(methods)
    p.set_defaults(func=lambda args: p.print_help() or 2)
