"""``--config FILE.yaml`` and ``--print-config`` for the long-running commands (finetune, pretrain, segment).

A config file is a YAML (or JSON) mapping of option names — the long flag without its dashes, ``-`` or ``_`` —
to values; flags on the command line override it. A week-long pretraining run is then one reviewable file plus
the few flags that change between runs, and ``run.json`` records what the run really used.

Why a two-pass parse instead of reading the file inside each command: the file's values must behave exactly like
the flags (``type``, ``choices``, ``nargs``, ``store_true`` / ``BooleanOptionalAction``) and a required option may
come from the file. The first pass (required options relaxed) only finds the command and its ``--config``; the
file's keys are checked against that command's argparse actions, converted through each action's ``type`` and
installed with ``set_defaults``; the second, normal pass lets the command line win. Every mistake in the file
ends as one line and exit code 2 from the parser, before any run folder exists.

A command opts in with one line in its parser definition: ``config.add_config_option(p)``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vocoslicer.errors import VoCoError

_MARK = "_config_parser"  # namespace default naming the opted-in parser that was selected; removed after parsing
_OWN = ("config", "print_config")


def add_config_option(p: argparse.ArgumentParser) -> None:
    """Give the command ``p`` the ``--config FILE`` and ``--print-config`` options."""
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="read options from a YAML/JSON mapping (option: value, names as the long flags without "
                        "dashes); flags on the command line override it; path and sha256 are saved in run.json")
    p.add_argument("--print-config", action="store_true",
                   help="print every option's resolved value as YAML (a starting --config file) and exit")
    p.set_defaults(**{_MARK: p})


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the config file of the selected command applied (see module doc).

    Exits 2 with one line for a bad file; prints the resolved options and exits 0 for ``--print-config``.
    """
    argv = list(argv)
    with _relaxed(_opted_in(parser)):  # pass 1: which command, which file (its required options may be in it)
        first = parser.parse_args(argv)
    target = getattr(first, _MARK, None)
    if target is None:  # a command without config support: pass 1 was already the normal parse
        return first
    path, digest = None, None
    if first.config is not None:
        path, data, digest = _read(target, first.config)
        values = _convert(target, path, data)
        target.set_defaults(**values)
        for action in target._actions:
            if action.dest in values:
                action.required = False  # given by the file; argparse checks required by flags seen
    with _relaxed([target] if first.print_config else []):
        args = parser.parse_args(argv)
    delattr(args, _MARK)
    args.config = None if path is None else str(path)
    args.config_sha256 = digest
    if args.print_config:
        sys.stdout.write(dump(target, args))
        raise SystemExit(0)
    delattr(args, "print_config")
    return args


def resolved(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every config-settable option of ``p`` with its value in ``args`` (plain YAML/JSON types)."""
    out: dict[str, Any] = {}
    for action in _settable(p):
        value = getattr(args, action.dest, None)
        out[_key(action)] = json.loads(json.dumps(value, default=str))  # Path -> str, tuple -> list
    return out


def dump(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The resolved options as a YAML document that ``--config`` reads back to the same values."""
    yaml = _yaml(p)
    head = f"# {p.prog}: resolved options (use with --config FILE; command-line flags override them)\n"
    return head + yaml.safe_dump(resolved(p, args), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------- internals
def _yaml(p: argparse.ArgumentParser) -> Any:
    """PyYAML, imported only when a YAML file is read or printed (a JSON config works without it)."""
    try:
        import yaml
    except ImportError:
        p.error("--config: YAML needs the PyYAML package (vocoslicer env lists what is missing); "
                "a .json config file works without it")
    return yaml


def _opted_in(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser under ``parser`` (sub-commands, recursively) that called :func:`add_config_option`."""
    found, todo, seen = [], [parser], set()
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p._defaults.get(_MARK) is p:
            found.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


@contextlib.contextmanager
def _relaxed(parsers: list[argparse.ArgumentParser]) -> Iterator[None]:
    """Make every option and positional of ``parsers`` optional for one parse, then restore them."""
    saved = [(a, a.required) for p in parsers for a in p._actions]
    for action, _ in saved:
        action.required = False
    try:
        yield
    finally:
        for action, required in saved:
            action.required = required


def _settable(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a config file may set: the command's long options, without help and the config options."""
    # hidden options (help=SUPPRESS: the old spellings kept as aliases) are never keys: their dest has its own option
    return [a for a in p._actions
            if any(s.startswith("--") for s in a.option_strings) and a.default is not argparse.SUPPRESS
            and a.help is not argparse.SUPPRESS and a.dest not in _OWN and a.dest != _MARK]


def _key(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))[2:]


def _read(p: argparse.ArgumentParser, name: str) -> tuple[Path, Any, str]:
    path = Path(name).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        p.error(f"--config {name}: no such file")
    except OSError as exc:
        p.error(f"--config {name}: cannot read it ({exc.strerror or exc})")
    try:
        text = raw.decode("utf-8-sig")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _yaml(p).safe_load(text)
    except UnicodeDecodeError:
        p.error(f"--config {name}: not a UTF-8 text file")
    except json.JSONDecodeError as exc:
        p.error(f"--config {name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and its subclasses; one line for the user
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        p.error(f"--config {name}: invalid YAML{where}: {problem}")
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        p.error(f"--config {name}: expected a mapping of option: value at the top level, got {kind}")
    return path.resolve(), data, hashlib.sha256(raw).hexdigest()


def _convert(p: argparse.ArgumentParser, path: Path, data: dict[Any, Any]) -> dict[str, Any]:
    """Check the file's keys against ``p``'s actions and convert the values as the flags would be."""
    by_name: dict[str, tuple[argparse.Action, bool]] = {}  # option name -> (action, is the --no- form)
    for action in _settable(p):
        for s in action.option_strings:
            if s.startswith("--"):
                by_name[s[2:]] = (action, isinstance(action, argparse.BooleanOptionalAction)
                                  and s.startswith("--no-"))
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        where = f"--config {path.name}: {key!r}"
        if not isinstance(key, str):
            p.error(f"--config {path.name}: option names must be text, got {key!r}")
        name = key.strip().lstrip("-").replace("_", "-")
        if name.replace("-", "_") in _OWN:
            p.error(f"{where} cannot be set in a config file")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.error(f"{where} is not an option of '{p.prog}'{hint}")
        action, negative = by_name[name]
        if action.dest in given:
            p.error(f"{where} sets the same option as {given[action.dest]!r}")
        given[action.dest] = key
        values[action.dest] = _value(p, action, negative, value, where)
    return {dest: v for dest, v in values.items() if v is not _UNSET}


_UNSET = object()


def _value(p: argparse.ArgumentParser, action: argparse.Action, negative: bool, value: Any, where: str) -> Any:
    if value is None:  # "unset": only where the option has no default (what --print-config writes for those)
        if action.default is None:
            return _UNSET
        p.error(f"{where} cannot be null (its default is {action.default!r})")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            p.error(f"{where} expects true or false, got {value!r}")
        return value != negative
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const: the flag or not
        if not isinstance(value, bool):
            p.error(f"{where} expects true or false, got {value!r}")
        return action.const if value else action.default
    if not isinstance(action, argparse._StoreAction):
        p.error(f"{where} cannot be set in a config file")
    nargs = action.nargs
    if nargs in (None, argparse.OPTIONAL):
        return _one(p, action, _text(p, value, where), where)
    items = value if isinstance(value, list) else [value]
    if nargs == argparse.ONE_OR_MORE and not items:
        p.error(f"{where} expects at least one value")
    if isinstance(nargs, int) and len(items) != nargs:
        p.error(f"{where} expects {nargs} values, got {len(items)}")
    return [_one(p, action, _text(p, v, where), where) for v in items]


def _text(p: argparse.ArgumentParser, value: Any, where: str) -> str:
    """A file value as the text typed after the flag: a list joins with commas (``roi: [96, 96, 64]`` is
    ``--roi 96,96,64``), a mapping becomes JSON text (``--preprocessing`` takes JSON)."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            p.error(f"{where} expects one value or a list of numbers/text, got {value!r}")
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"  # a string option taking yes/no text; int/float reject it below
    if isinstance(value, str | int | float):
        return str(value)
    p.error(f"{where} has an unsupported value {value!r}")
    raise AssertionError  # p.error exits


def _one(p: argparse.ArgumentParser, action: argparse.Action, text: str, where: str) -> Any:
    convert = action.type if callable(action.type) else str
    try:
        result = convert(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError, VoCoError) as exc:
        name = getattr(convert, "__name__", "")
        own = isinstance(exc, argparse.ArgumentTypeError | VoCoError)  # the type's own message, as for the flag
        detail = str(exc) if own else f"invalid {name} value {text!r}"
        p.error(f"{where}: {detail}")
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        p.error(f"{where}: invalid choice {result!r} (choose from {choices})")
    return result
