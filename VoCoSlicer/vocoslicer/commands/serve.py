"""``vocoslicer serve --stdio``: a warm worker answering segment/classify requests as JSON lines."""

from __future__ import annotations

import argparse

from vocoslicer.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` command."""
    p = sub.add_parser("serve", help="warm worker: keep models loaded and answer JSON-line requests",
                       description="Reads one JSON request per line on stdin ({\"id\", \"op\": segment|classify|"
                                   "ping|shutdown, \"input\", \"output\", \"model\", \"device\"}) and answers with "
                                   "event lines and one final result/error line per request on stdout.")
    p.add_argument("--stdio", action="store_true", help="serve over stdin/stdout (the only transport)")
    p.add_argument("--device", default="auto", help="default device of requests that name none (auto|cpu|cuda)")
    p.add_argument("--cache-size", type=int, default=2, help="models kept loaded at once (default 2)")
    from vocoslicer.commands.segment import add_runtime_flags

    add_runtime_flags(p)
    p.set_defaults(func=run, validate=validate)


def validate(args: argparse.Namespace) -> None:
    """Argument checks before the worker starts."""
    from vocoslicer.commands._jobsetup import check_device

    if not args.stdio:
        raise UserError("serve needs --stdio (requests as JSON lines on stdin, replies on stdout)")
    if args.cache_size < 1:
        raise UserError(f"--cache-size must be at least 1, got {args.cache_size}")
    check_device(args.device)
    from vocoslicer.infer.runtime import check_runtime

    check_runtime(args.runtime)


def run(args: argparse.Namespace) -> int:
    """Handler: serve until shutdown or end of input."""
    from vocoslicer.infer.worker import serve_stdio

    if not args.stdio:
        raise UserError("serve needs --stdio (requests as JSON lines on stdin, replies on stdout)")
    if args.cache_size < 1:
        raise UserError(f"--cache-size must be at least 1, got {args.cache_size}")
    return serve_stdio(args.device, args.cache_size, args.runtime, args.threads)
