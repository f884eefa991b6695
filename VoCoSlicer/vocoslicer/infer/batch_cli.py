"""The batch and DICOM SEG side of ``vocoslicer segment``, kept here so that ``commands/segment.py`` only dispatches.

``segment IN -o OUT.nii.gz`` stays the single-case command. It becomes a batch when several inputs, a list file,
``--cohort`` or an output folder (a name without a volume extension) are given; a ``.dcm`` output or
``--format dicom-seg`` writes a DICOM SEG (single case or batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vocoslicer.contracts.torchrun import env_rank
from vocoslicer.errors import UserError
from vocoslicer.infer.batch_inputs import LIST_EXTENSIONS, OUTPUT_EXTENSIONS, Case

if TYPE_CHECKING:
    from vocoslicer.infer.batch import BatchOptions

_FILE_OUTPUTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The options of batch mode and DICOM SEG output."""
    p.add_argument("more_inputs", nargs="*", metavar="INPUT",
                   help="more inputs: any mix of volume files, folders of volumes, DICOM trees (one case per "
                        "series) and .txt list files (one input per line); with several inputs -o is a folder")
    p.add_argument("--format", dest="out_format", choices=tuple(OUTPUT_EXTENSIONS), default=None,
                   help="output format (default: from the output name; nifti in batch mode). dicom-seg writes a "
                        "DICOM Segmentation referencing the source DICOM series")
    p.add_argument("--dicom-source", default=None, metavar="DIR",
                   help="the DICOM series a NIfTI/NRRD input was made from (needed for --format dicom-seg)")
    p.add_argument("--cohort", default=None, metavar="C", help="segment the cases of cohort C (batch mode)")
    p.add_argument("--unlabelled", action="store_true",
                   help="with --cohort: only cases without a label, written into the cohort as uncorrected "
                        "proposals with the model's provenance")


def is_batch(args: argparse.Namespace) -> bool:
    """Whether the arguments ask for batch mode (see module docstring)."""
    if args.cohort or args.more_inputs:
        return True
    if args.input and Path(args.input).suffix.lower() in LIST_EXTENSIONS and Path(args.input).is_file():
        return True
    out = str(args.output or "")
    # an existing folder, or a name without an extension, is an output folder; "seg.png" is a bad file name
    return bool(out) and (Path(out).is_dir() or (not out.lower().endswith(_FILE_OUTPUTS) and not Path(out).suffix))


def wants_dicom_seg(args: argparse.Namespace) -> bool:
    """Single-case DICOM SEG: ``--format dicom-seg`` or a ``.dcm`` output name."""
    return args.out_format == "dicom-seg" or str(args.output or "").lower().endswith(".dcm")


def _options(args: argparse.Namespace, fmt: str) -> BatchOptions:
    from vocoslicer.infer.batch import BatchOptions

    return BatchOptions(model=args.model, device=args.device, fmt=fmt, fast=args.fast, overlap=args.overlap,
                        largest_component=args.largest_component, dicom_source=args.dicom_source,
                        cohort=args.cohort, unlabelled=args.unlabelled,
                        runtime=getattr(args, "runtime", "eager"))


def run_batch_command(args: argparse.Namespace) -> int:
    """``segment INPUT... -o OUT_DIR`` / ``segment --cohort C [--unlabelled]``: returns the exit code."""
    from vocoslicer.infer.batch import format_summary, run_batch
    from vocoslicer.infer.batch_inputs import cohort_cases, expand_inputs

    if args.truth:
        raise UserError("--truth compares one segmentation; it cannot be used in batch mode")
    from vocoslicer.infer.runtime import apply_threads, check_runtime

    check_runtime(getattr(args, "runtime", "eager"))
    apply_threads(getattr(args, "threads", None))
    if args.unlabelled and not args.cohort:
        raise UserError("--unlabelled needs --cohort C")
    if args.cohort:
        if args.input or args.more_inputs:
            raise UserError("give either input files/folders or --cohort, not both")
        cases, bad = cohort_cases(args.cohort, args.unlabelled), []
        if not args.unlabelled and not args.output:
            raise UserError("--cohort without --unlabelled writes into a folder: give -o OUT_DIR")
    else:
        if not args.input:
            raise UserError("no input given (volume files, folders, DICOM trees, a list file, or --cohort C)")
        if not args.output:
            raise UserError("batch mode needs -o OUT_DIR (a folder)")
        cases, bad = expand_inputs([args.input, *args.more_inputs])
    if not cases:
        why = "; ".join(f"{b.source}: {b.error}" for b in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3
                                                                         else "")
        raise UserError(f"nothing to segment{' (every case is labelled)' if args.unlabelled else ''}"
                        + (f": {why}" if why else ""))
    fmt = args.out_format or "nifti"
    out_dir = None if (args.cohort and args.unlabelled and not args.output) else args.output
    summary = run_batch(cases, bad, out_dir, _options(args, fmt))
    if env_rank() == 0:
        out = sys.stderr if args.events == "stdout" else sys.stdout
        print(format_summary(summary, out_dir or str(args.cohort)), file=out)
    return summary.exit_code


def run_single_dicom_seg(args: argparse.Namespace) -> int:
    """``segment IN -o OUT.dcm``: one case written as a DICOM SEG (refused for non-DICOM input without a source)."""
    import time

    from vocoslicer.device import pick_device
    from vocoslicer.infer.batch import CaseRunner, check_dicom_seg_inputs, write_result
    from vocoslicer.io.dicom_seg import dicom_series_files
    from vocoslicer.jobs import current_job
    from vocoslicer.models.installed import resolve

    if args.truth:
        raise UserError("--truth is not available with a DICOM SEG output (compare a NIfTI/NRRD output instead)")
    src = Path(args.input)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.is_dir():
        files = dicom_series_files(src, args.series)
        case = Case(id="case", source=str(src), files=tuple(files), series_uid=args.series)
    else:
        case = Case(id="case", source=str(src))
    opts = _options(args, "dicom-seg")
    source_files = check_dicom_seg_inputs([case], opts)  # refuses NIfTI/NRRD without --dicom-source
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name such as {out / 'segmentation.dcm'}")
    job = current_job()
    t0 = time.perf_counter()
    bundle = resolve(args.model)
    dev = pick_device(args.device)
    with job.gpu_lock(dev):
        runner = CaseRunner(bundle, dev, opts)
        img, prepared = runner.load(case)
        label = runner.infer(img, prepared, cancel=job.should_stop)
    if job.should_stop():
        from vocoslicer.errors import Cancelled

        raise Cancelled("segmentation cancelled; nothing was written")
    write_result(label, img, case, out, opts, bundle, source_files)
    seconds = time.perf_counter() - t0
    job.events.artifact(out, "segmentation", format="dicom-seg", model=bundle.id, model_version=bundle.version,
                        seconds=round(seconds, 3))
    stream = sys.stderr if args.events == "stdout" else sys.stdout
    print(f"wrote {out} (DICOM SEG, {bundle.describe()}, {seconds:.1f} s)", file=stream)
    return 0
