"""``vocoslicer cohort init|add|list|remove|split|export|rank|curve``: manage a local cohort of corrected cases."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vocoslicer.commands import _cohort_classes as cohort_classes


def _open(args: argparse.Namespace) -> Any:
    from vocoslicer.data.cohort import Cohort

    cohort = Cohort(args.cohort)
    if cohort.warning:
        sys.stderr.write(f"vocoslicer: warning: {cohort.warning}\n")
        cohort.repair()
    return cohort


def _init(args: argparse.Namespace) -> int:
    from vocoslicer.data.cohort import Cohort

    cohort = Cohort.init(args.cohort, val_ratio=args.val_ratio, labels=args.labels)
    print(json.dumps({"cohort": str(cohort.root), "version": cohort.version}))
    return 0


def _add(args: argparse.Namespace) -> int:
    from vocoslicer.data.cohort import Provenance
    from vocoslicer.errors import UserError

    if args.labels and not args.label:
        raise UserError("--labels needs --label (a label map)")
    cohort = _open(args)
    cohort_classes.precheck(cohort, args)
    prov = Provenance(model_id=args.model_id or "", model_version=args.model_version or "",
                      model_sha256=args.model_sha256 or "", corrected=not args.uncorrected, by=args.by or "",
                      note=args.note or "")
    res = cohort.add(args.image, label=args.label, labels=args.labels, provenance=prov, case_id=args.id,
                     split=args.split, resample_label=args.resample_label)
    class_version = cohort_classes.apply(cohort, args, res.case_id, prov)
    print(json.dumps({"case": res.case_id, "created": res.created, "label_version": res.label_version,
                      "class_version": class_version, "cohort_version": cohort.version}))
    return 0


def _list(args: argparse.Namespace) -> int:
    cohort = _open(args)
    cases = cohort.cases()
    data = cohort.manifest
    if args.json:
        out = {"cohort": str(cohort.root), "version": cohort.version, "labels": cohort.labels.to_list(),
               **cohort_classes.list_json(data),
               "cases": [{"id": c.id, "image": str(c.image), "split": c.split, "hash": c.hash,
                          "label": str(c.label) if c.label else None,
                          "label_versions": [{k: v for k, v in lv.items() if k != "abs_path"}
                                             for lv in c.label_versions],
                          **cohort_classes.case_json(data, c.id)} for c in cases]}
        print(json.dumps(out, indent=2))
        return 0
    n_lab = sum(c.labelled for c in cases)
    print(f"{cohort.root}  version {cohort.version}  {len(cases)} cases ({n_lab} labelled, "
          f"{len(cases) - n_lab} unlabelled)")
    if counts := cohort_classes.counts_text(data):
        print(f"  {counts}")
    for c in cases:
        prov = c.label_versions[-1]["provenance"] if c.labelled else {}
        who = (f"v{len(c.label_versions)} {'corrected' if prov.get('corrected') else 'proposed'}"
               f"{' by ' + prov['by'] if prov.get('by') else ''}"
               f"{' from ' + prov['model_id'] if prov.get('model_id') else ''}") if c.labelled else "unlabelled"
        print(f"  {c.id:12s} {c.split or '-':6s} {who}{cohort_classes.case_text(data, c.id)}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    cohort = _open(args)
    for cid in args.case:
        version = cohort.remove(cid)
    print(json.dumps({"removed": args.case, "cohort_version": version}))
    return 0


def _split(args: argparse.Namespace) -> int:
    cohort = _open(args)
    if args.val or args.train:
        if args.val:
            cohort.set_split(args.val, "val", force=args.force)
        if args.train:
            cohort.set_split(args.train, "train", force=args.force)
    else:
        cohort.assign_splits(args.val_ratio)
    cases = cohort.cases()
    print(json.dumps({"cohort_version": cohort.version,
                      "val": [c.id for c in cases if c.split == "val"],
                      "train": [c.id for c in cases if c.split == "train"]}))
    return 0


def _export(args: argparse.Namespace) -> int:
    path = _open(args).export(args.out)
    print(json.dumps({"dataset": str(path)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cohort`` command group."""
    p = sub.add_parser("cohort", help="manage a local cohort of images and corrected label maps")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", parser_class=type(p))

    v = verbs.add_parser("init", help="create an empty cohort folder")
    v.add_argument("cohort", help="cohort folder (new or empty)")
    v.add_argument("--val-ratio", type=float, default=0.2, help="fraction of labelled cases kept for validation")
    v.add_argument("--labels", help="labels table CSV (value,name,r,g,b...) for the cohort")
    v.set_defaults(func=_init)

    v = verbs.add_parser("add", help="add an image, optionally with its label map (a known image gets a new "
                                     "label version)")
    v.add_argument("cohort")
    v.add_argument("--image", required=True, help="image file or DICOM folder")
    v.add_argument("--label", help="label map (same grid as the image)")
    v.add_argument("--labels", help="labels table CSV of the label map (needed for a cohort's first label)")
    v.add_argument("--id", help="case id (default: case0001, case0002, ...)")
    v.add_argument("--split", choices=("train", "val"), help="place the case explicitly (default: automatic)")
    v.add_argument("--resample-label", action="store_true",
                   help="resample a label on another grid onto the image (nearest), if they overlap")
    v.add_argument("--model-id", help="bundle id of the model that proposed the label")
    v.add_argument("--model-version", help="version of that bundle")
    v.add_argument("--model-sha256", help="sha256 of that bundle's weights")
    v.add_argument("--uncorrected", action="store_true", help="the label is a raw model proposal")
    v.add_argument("--by", help="who corrected the label (default: the current user)")
    v.add_argument("--note", help="free-text note")
    cohort_classes.add_class_args(v)
    v.set_defaults(func=_add)

    v = verbs.add_parser("list", help="list the cases")
    v.add_argument("cohort")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_list)

    v = verbs.add_parser("remove", help="remove cases and their files")
    v.add_argument("cohort")
    v.add_argument("case", nargs="+")
    v.set_defaults(func=_remove)

    v = verbs.add_parser("split", help="assign new labelled cases to train/val (existing assignments stay), or "
                                       "place cases explicitly")
    v.add_argument("cohort")
    v.add_argument("--val-ratio", type=float, help="new validation ratio (applies to unassigned cases)")
    v.add_argument("--val", nargs="+", metavar="CASE", help="put these cases in validation")
    v.add_argument("--train", nargs="+", metavar="CASE", help="put these cases in training")
    v.add_argument("--force", action="store_true", help="allow moving already assigned cases")
    v.set_defaults(func=_split)

    v = verbs.add_parser("export", help="write an MSD-style copy (imagesTr/labelsTr/imagesUn + dataset.json)")
    v.add_argument("cohort")
    v.add_argument("--out", required=True, help="new folder")
    v.set_defaults(func=_export)
    cohort_classes.register_verbs(verbs)

    from vocoslicer.commands import cohort_active

    cohort_active.register(verbs)  # rank, curve
    p.set_defaults(func=lambda args: p.print_help() or 2)
