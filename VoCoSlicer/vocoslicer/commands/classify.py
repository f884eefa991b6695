"""``vocoslicer classify IN --model M [-o out.json|out.csv]``: class probabilities of a whole volume."""

from __future__ import annotations

import argparse
import json
import sys

from vocoslicer.jobs.runner import add_events_argument


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``classify`` command."""
    p = sub.add_parser("classify", help="classify a CT volume with a classification model bundle",
                       description="Prints the probability of every class (softmax; a multi-label model: independent "
                                   "sigmoids and the positive classes); -o writes them as JSON or CSV "
                                   "(atomically).")
    p.add_argument("input", help="volume file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    p.add_argument("--model", required=True, help="classification bundle path, installed ID or ID@VERSION")
    p.add_argument("-o", "--output", default=None, help="write the result to a .json or .csv file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when the folder holds several series")
    add_events_argument(p)
    p.set_defaults(func=run, validate=validate)


def validate(args: argparse.Namespace) -> None:
    """Argument checks before any work: device, input present, output format/folder (not the input)."""
    from pathlib import Path

    from vocoslicer.commands._jobsetup import check_device
    from vocoslicer.errors import UserError
    from vocoslicer.infer.classify import OUTPUT_FORMATS
    from vocoslicer.io import check_output_path

    check_device(args.device)
    if not Path(args.input).exists():
        raise UserError(f"{args.input}: no such file or folder")
    if args.output:
        check_output_path(args.output, inputs=[args.input], extensions=OUTPUT_FORMATS)


def run(args: argparse.Namespace) -> int:
    """Handler: classify and print the probabilities."""
    from vocoslicer.infer.classify import output_format, run_classify
    from vocoslicer.jobs.context import current_job

    if args.output:
        output_format(args.output)  # fail before any work on a bad output name
    events = current_job().events  # stdout events with --events stdout, else warnings on stderr (jobs.runner)
    result = run_classify(args.input, args.output, args.model, args.device, args.series, events)
    out = sys.stderr if args.events == "stdout" else sys.stdout
    if args.output:
        print(f"wrote {result['output']}: {result['predicted']['name']} ({result['predicted']['probability']:.3f})",
              file=out)
    else:
        keys = ("classes", "probabilities", "predicted", "multi_label", "positive")
        print(json.dumps({k: result[k] for k in keys if k in result}, indent=2), file=out)
    return 0
