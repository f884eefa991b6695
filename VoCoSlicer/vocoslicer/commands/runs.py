"""``vocoslicer runs list|show``: what ran, what is running, and why a run failed, from a terminal.

The same information the Slicer job panel shows, read from the run directories (``run.json``, ``log.txt``), so
a run started from Slicer can be inspected over ssh and vice versa.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vocoslicer.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``runs list`` and ``runs show``."""
    p = sub.add_parser("runs", help="list job runs and show their status and last errors")
    actions = p.add_subparsers(dest="action", metavar="<action>", parser_class=type(p))
    ls = actions.add_parser("list", help="list the runs under a folder, newest first")
    ls.add_argument("--root", type=Path, help="folder holding run directories (default: <VOCOSLICER_HOME>/runs)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=list_cmd)
    sh = actions.add_parser("show", help="status of one run and the last lines of its log")
    sh.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sh.add_argument("--tail", type=int, default=20, metavar="N", help="log lines to show (default 20)")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=show_cmd)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def list_cmd(args: argparse.Namespace) -> int:
    """Print one line per run: status, exit code, start time, command, folder."""
    from vocoslicer import paths
    from vocoslicer.jobs.rundir import list_runs

    root = args.root if args.root is not None else paths.runs_dir()
    if not Path(root).is_dir():
        raise UserError(f"{root}: no such folder")
    runs = list_runs(root)
    if args.json:
        keys = ("run_dir", "id", "command", "status", "exit_code", "started", "ended", "error", "pid")
        print(json.dumps([{k: r.get(k) for k in keys} for r in runs], indent=2))
        return 0
    for r in runs:
        code = "-" if r.get("exit_code") is None else str(r["exit_code"])
        print(f"{r.get('status', '?'):<9} {code:>2}  {r.get('started') or '-':<24} "
              f"{r.get('command') or '-':<16} {r['run_dir']}")
    if not runs:
        sys.stderr.write(f"no runs under {root}\n")
    return 0


def show_cmd(args: argparse.Namespace) -> int:
    """Print the run's status, its error line and the tail of ``log.txt``."""
    from vocoslicer.jobs.rundir import LOG_TXT, read_run, tail_lines

    run = read_run(args.run_dir)
    if not run:
        raise UserError(f"{args.run_dir}: not a run directory (no readable run.json)")
    lines = tail_lines(Path(args.run_dir) / LOG_TXT, args.tail)
    if args.json:
        print(json.dumps({**run, "log_tail": lines}, indent=2))
        return 0
    print(f"run:      {args.run_dir}")
    print(f"command:  vocoslicer {' '.join(run.get('argv') or [])}")
    print(f"status:   {run.get('status')} (exit code {run.get('exit_code')}, attempt {run.get('attempt')})")
    print(f"pid:      {run.get('pid')} on {run.get('host')}")
    print(f"started:  {run.get('started')}   ended: {run.get('ended') or '-'}")
    if run.get("error"):
        print(f"error:    {run['error']}")
    if run.get("status") == "dead":
        print("note:     the process is gone without having recorded an end; rerun with --resume to continue")
    if lines:
        print(f"--- last {len(lines)} lines of {LOG_TXT}")
        print("\n".join(lines))
    return 0
