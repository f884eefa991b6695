#!/usr/bin/env python3
"""Regenerate the SCRIPTS/RESOURCES file lists of the Slicer module CMakeLists.txt files from the files on disk.

slicerMacroBuildScriptedModule fails at configure time when a listed file is missing and silently leaves out a
file that is not listed, so the lists must match the tree exactly. Many people add engine files at once, so the
lists are generated between marker comments instead of being edited by hand:

    # BEGIN GENERATED SCRIPTS (scripts/update_cmake_lists.py)
    ...
    # END GENERATED SCRIPTS

Files considered are those git tracks plus untracked files git does not ignore (``__pycache__`` and build
outputs never count), still present on disk. ``--check`` rewrites nothing and exits 1 when a list is stale.

Usage: ``python scripts/update_cmake_lists.py [--check] [--root DIR]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN = "# BEGIN GENERATED {kind} (scripts/update_cmake_lists.py)"
END = "# END GENERATED {kind}"


@dataclass(frozen=True)
class ModuleSpec:
    """Which files of one module directory go into its SCRIPTS and RESOURCES lists."""

    directory: str
    script_roots: tuple[str, ...]  # "." = top-level *.py of the module dir only; a package dir = all its *.py
    resource_roots: tuple[str, ...]  # every non-.py file below these folders


MODULES: tuple[ModuleSpec, ...] = (
    ModuleSpec("VoCoSlicer", (".", "VoCoSlicerLib", "vocoslicer"), ("Resources", "vocoslicer/resources")),
    ModuleSpec("VoCoSegment", (".",), ("Resources",)),
    ModuleSpec("VoCoPretrain", (".",), ("Resources",)),
)

_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def repo_files(root: Path, directory: str) -> list[str]:
    """Files under ``directory`` (relative to it) that git tracks or would track, and that exist on disk."""
    cmd = ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", directory]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8")
    base = root / directory
    files = set()
    for name in out.split("\0"):
        if not name:
            continue
        path = root / name
        rel = path.relative_to(base)
        if _SKIP_PARTS & set(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
            continue
        if path.is_file():
            files.add(rel.as_posix())
    return sorted(files)


def expected_lists(root: Path, spec: ModuleSpec) -> dict[str, list[str]]:
    """The SCRIPTS and RESOURCES lists a module's CMakeLists.txt must hold."""
    files = repo_files(root, spec.directory)
    scripts, resources = [], []
    for rel in files:
        parts = rel.split("/")
        in_resources = any(rel.startswith(r.rstrip("/") + "/") for r in spec.resource_roots)
        if rel.endswith(".py") and not in_resources:
            if (len(parts) == 1 and "." in spec.script_roots) or (len(parts) > 1 and parts[0] in spec.script_roots):
                scripts.append(rel)
        elif in_resources:
            resources.append(rel)
    return {"SCRIPTS": sorted(scripts), "RESOURCES": sorted(resources)}


def render(text: str, kind: str, items: list[str], source: str) -> str:
    """Replace the block between the markers of ``kind`` with ``items`` (one per line, indented like BEGIN)."""
    begin, end = BEGIN.format(kind=kind), END.format(kind=kind)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise SystemExit(f"{source}: needs exactly one '{begin}' ... '{end}' block")
    indent = lines[starts[0]][: len(lines[starts[0]]) - len(lines[starts[0]].lstrip())]
    body = [f"{indent}{item}\n" for item in items]
    return "".join(lines[: starts[0] + 1] + body + lines[ends[0]:])


def listed(text: str, kind: str) -> list[str]:
    """The file names currently listed between the markers of ``kind``."""
    begin, end = BEGIN.format(kind=kind), END.format(kind=kind)
    inside, out = False, []
    for line in text.splitlines():
        s = line.strip()
        if s == begin:
            inside = True
        elif s == end:
            inside = False
        elif inside and s and not s.startswith("#"):
            out.append(s)
    return out


def update(root: Path, check: bool) -> list[str]:
    """Rewrite (or only compare) every module's lists; return a description of each stale list."""
    problems = []
    for spec in MODULES:
        cmake = root / spec.directory / "CMakeLists.txt"
        text = cmake.read_text(encoding="utf-8")
        new = text
        for kind, items in expected_lists(root, spec).items():
            have = listed(new, kind)
            if have != items:
                missing = sorted(set(items) - set(have))
                extra = sorted(set(have) - set(items))
                problems.append(f"{cmake.relative_to(root)}: {kind} out of date"
                                + (f"; not listed: {missing}" if missing else "")
                                + (f"; listed but absent: {extra}" if extra else "")
                                + ("; order differs" if not missing and not extra else ""))
            new = render(new, kind, items, str(cmake))
        if not check and new != text:
            cmake.write_text(new, encoding="utf-8")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale lists (exit 1 if any)")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root")
    args = ap.parse_args(argv)
    problems = update(args.root.resolve(), args.check)
    for p in problems:
        print(p, file=sys.stderr if args.check else sys.stdout)
    if args.check:
        return 1 if problems else 0
    if not problems:
        print("CMake file lists already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
