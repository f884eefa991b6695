"""``vocoslicer models list|download|import|remove``: the model catalog and the installed bundles."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vocoslicer.jobs.runner import add_events_argument


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` command group."""
    p = sub.add_parser("models", help="list, download, import or remove models",
                       description="Official VoCo weights come from the catalog (resources/models.json or "
                                   "VOCOSLICER_CATALOG); installed bundles live in VOCOSLICER_HOME/models.")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", parser_class=type(p))

    ls = verbs.add_parser("list", help="catalog models and installed bundles")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    dl = verbs.add_parser("download", help="download a catalog model (resumable, sha256-checked) and install it")
    dl.add_argument("id", help="catalog id (see 'models list'), optionally ID@VERSION")
    dl.add_argument("--force", action="store_true", help="reinstall even if already installed")
    dl.add_argument("--keep-download", action="store_true", help="keep the original .pt next to the bundle")
    dl.add_argument("--json", action="store_true", help="print the result as JSON")
    add_events_argument(dl, help="JSON-lines progress events on stdout (for the Slicer module)")
    dl.set_defaults(func=_download)

    im = verbs.add_parser("import", help="install a local bundle folder/zip or an official .pt (offline)")
    im.add_argument("path", help="bundle folder, bundle .zip, or checkpoint .pt/.pth/.safetensors")
    im.add_argument("--id", default=None, help="model id to install under (default: from the bundle/catalog/file)")
    im.add_argument("--version", default=None, help="version to install under (default 1.0.0 for checkpoints)")
    im.add_argument("--labels", default=None, help="labels CSV for a segmentation checkpoint not in the catalog")
    im.add_argument("--force", action="store_true", help="replace an installed model with the same id@version")
    im.add_argument("--json", action="store_true", help="print the result as JSON")
    im.set_defaults(func=_import)

    rm = verbs.add_parser("remove", help="delete an installed model (ID or ID@VERSION)")
    rm.add_argument("id")
    rm.add_argument("--json", action="store_true", help="print the result as JSON")
    rm.set_defaults(func=_remove)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _print(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


def _list(args: argparse.Namespace) -> int:
    from vocoslicer.models.catalog import load_catalog
    from vocoslicer.models.installed import list_installed

    bundles = list_installed()
    have = {(b.id, b.version) for b in bundles}
    catalog = [{**e.to_dict(), "installed": (e.id, e.version) in have} for e in load_catalog()]
    local = [{"id": b.id, "version": b.version, "task": b.task, "architecture": b.architecture[0],
              "path": str(b.path), "title": b.meta.get("title", "")} for b in bundles]
    if args.json:
        print(json.dumps({"catalog": catalog, "installed": local}, indent=2))
        return 0
    print("catalog:")
    for e in catalog:
        size = f"{e['size_bytes'] / 1e6:,.0f} MB" if e.get("size_bytes") else "? MB"
        mark = "installed" if e["installed"] else ""
        print(f"  {e['id']:<16} {e['version']:<8} {e['task']:<13} {size:>10}  {e['title']}  {mark}")
    print("installed:")
    for b in local or [{"id": "(none)", "version": "", "task": "", "path": ""}]:
        print(f"  {b['id']:<24} {b['version']:<8} {b['task']:<13} {b['path']}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from vocoslicer.jobs.events import EventSink
    from vocoslicer.models.download import ProgressBar, install_from_catalog

    events = EventSink(stdout=args.events == "stdout")
    bar = None if args.events == "stdout" else ProgressBar(args.id)
    result = install_from_catalog(args.id, events, bar, force=args.force, keep_download=args.keep_download)
    out = sys.stderr if args.events == "stdout" and not args.json else sys.stdout
    text = f"{result['status']}: {result['id']}@{result['version']} in {result['path']}"
    if result.get("load_report"):
        text += f"\n{result['load_report']}"
    if result.get("status") == "installed" and not result.get("sha256_verified"):
        text += f"\nwarning: sha256 not published; computed {result['sha256']} (recorded, not verified)"
    print(json.dumps(result, indent=2) if args.json else text, file=out)
    return 0


def _import(args: argparse.Namespace) -> int:
    from vocoslicer.models.download import import_path

    result = import_path(args.path, args.id, args.version, args.labels, args.force)
    text = f"{result['status']}: {result['id']}@{result['version']} in {result['path']}"
    if result.get("load_report"):
        text += f"\n{result['load_report']}"
    _print(result, args.json, text)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from vocoslicer.models.download import remove_installed

    result = remove_installed(args.id)
    _print(result, args.json, f"removed {result['removed']} ({result['path']})")
    return 0
