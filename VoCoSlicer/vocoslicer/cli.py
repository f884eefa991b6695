"""The one command-line interface: ``python -m vocoslicer <command> ...``.

Subcommands live in :mod:`vocoslicer.commands` (one module each, discovered at start-up). Every error the user
can cause ends as one line on stderr and exit code 2; an unexpected failure prints one line (exit 1) and, with
``--debug``, the traceback.

A command may set a ``validate`` default next to ``func``: it runs before the job starts, so an argument error
leaves nothing behind (no run folder, no ``events.jsonl``). Library output (Python warnings, ITK/GDCM/MetaIO text,
nibabel) goes to the job's ``log.txt``, and to the terminal only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from vocoslicer import __version__, config
from vocoslicer.errors import EXIT_CRASH, EXIT_USER, Cancelled, VoCoError

log = logging.getLogger("vocoslicer")


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad options already; keep its message to one line plus the usage hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vocoslicer: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every discovered subcommand; exposed for tests and docs."""
    parser = _Parser(prog="vocoslicer", description="VoCo / PUMIT engine of the VoCoSlicer 3D Slicer extension.")
    parser.add_argument("--version", action="version", version=f"vocoslicer {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output on stderr")
    from vocoslicer.jobs.runner import add_job_arguments

    add_job_arguments(parser)  # --run-dir / --events: every command can run as a background job
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    import vocoslicer.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vocoslicer.commands.{info.name}")
        module.register(sub)
    _job_options_after_command(parser)
    return parser


def _job_options_after_command(parser: argparse.ArgumentParser) -> None:
    """Accept ``--run-dir`` / ``--events`` after the command too (``vocoslicer segment ... --run-dir R``).

    Every subcommand gets copies with ``default=SUPPRESS``: given there they win, not given they leave the
    top-level value alone. A command with its own ``--events`` (segment, classify) keeps it; the job reads both.
    """
    from vocoslicer.jobs.runner import add_events_argument

    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sp in set(action.choices.values()):
            if "--run-dir" not in sp._option_string_actions:
                sp.add_argument("--run-dir", dest="job_run_dir", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                                help="run as a job (same as the global --run-dir)")
            if "--events" not in sp._option_string_actions:
                add_events_argument(sp, dest="job_events", default=argparse.SUPPRESS,
                                    help="job events as JSON lines on stdout (as the global --events)")
            _job_options_after_command(sp)


def _route_library_output(verbose: bool) -> None:
    """Library warnings (Python ``warnings``: torch, MONAI; native output captured by vocoslicer.io.native) go to
    the job log, and to the terminal only with ``--verbose``: the user sees one line per problem, ours."""
    from vocoslicer.io.native import install_itk_logger
    from vocoslicer.jobs.runner import LIBRARY_LOGGERS

    install_itk_logger()
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.propagate = False
        if not lg.handlers:
            lg.addHandler(logging.NullHandler())
        if verbose:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)


def _one_line(exc: VoCoError) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (never raises for expected errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = config.parse_args(parser, argv)  # --config FILE / --print-config of the commands that take them
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    _route_library_output(args.verbose)
    validate = getattr(args, "validate", None)
    if validate is not None:  # argument errors before the run folder (run.json, events.jsonl, ...) exists
        try:
            validate(args)
        except VoCoError as exc:
            if args.debug:
                traceback.print_exc()
            sys.stderr.write(f"vocoslicer: error: {_one_line(exc)}\n")
            return exc.exit_code
    from vocoslicer.jobs.runner import start_job

    job = None  # run.json / events / log.txt / signals (vocoslicer.jobs); outcome recorded by job.finish
    error: BaseException | None = None
    try:
        job = start_job(args, argv)
        runner = getattr(args, "runner", None)
        if runner is not None:  # commands that wrap themselves
            code = int(runner(args) or 0)
        else:
            code = int(args.func(args) or 0)
    except VoCoError as exc:
        if args.debug:
            traceback.print_exc()
        prefix = "cancelled" if isinstance(exc, Cancelled) else "error"
        sys.stderr.write(f"vocoslicer: {prefix}: {_one_line(exc)}\n")
        code, error = exc.exit_code, exc
    except KeyboardInterrupt:
        sys.stderr.write("vocoslicer: cancelled: interrupted\n")
        code, error = Cancelled.exit_code, Cancelled("interrupted")
    except SystemExit as exc:  # a handler that exits on its own still gets its run recorded
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER)
        error = None if code == 0 else exc
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line for the user
        if args.debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        sys.stderr.write(f"vocoslicer: internal error: {type(exc).__name__}: {first} (rerun with --debug)\n")
        code, error = EXIT_CRASH, exc
    if job is not None:
        try:
            job.finish(code, error)
        except Exception as exc:  # noqa: BLE001 - recording the end must not change the outcome
            sys.stderr.write(f"vocoslicer: warning: could not record the end of the run: {exc}\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
