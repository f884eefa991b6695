"""``vocoslicer segment IN -o OUT``: segment a volume file or DICOM folder with a model bundle."""

from __future__ import annotations

import argparse
import sys

from vocoslicer import config
from vocoslicer.errors import UserError
from vocoslicer.jobs.runner import add_events_argument


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """``--runtime`` / ``--threads``: CPU inference speed (shared by ``segment`` and ``serve``)."""
    # no choices= here: building the parser must not import torch (vocoslicer.infer.runtime does); the value is
    # checked by check_runtime before any work
    p.add_argument("--runtime", default="auto",
                   help="CPU inference runtime: auto (the fastest installed, e.g. OpenVINO), eager (plain PyTorch), "
                        "openvino or openvino-f32; a runtime that fails falls back to eager with a warning")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS, else all cores)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` command."""
    p = sub.add_parser("segment", help="segment a CT volume (file or DICOM folder) with a model bundle",
                       description="Writes a label map on exactly the input's grid and its labels table "
                                   "(OUT with .labels.csv). Without --model the bundled demo model is used. "
                                   "Several inputs, a .txt list, --cohort or an output folder: batch mode "
                                   "(OUT_DIR/segment_status.jsonl; a rerun resumes). OUT.dcm: DICOM SEG.")
    p.add_argument("input", nargs="?", help="volume file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    p.add_argument("-o", "--output", help="output label map (.nii.gz, .nrrd, .mha, .seg.nrrd or .dcm), or a "
                                           "folder in batch mode")
    p.add_argument("--model", default=None, help="bundle path, installed model ID or ID@VERSION (default: demo model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--fast", action="store_true", help="run at 3 mm spacing (much faster, coarser)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the bundle's)")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when the folder holds several series")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest connected component of each label (removes stray islands)")
    p.add_argument("--uncertainty", action="store_true",
                   help="write a per-case uncertainty score (OUT with .uncertainty.json; from the same scores)")
    p.add_argument("--uncertainty-map", default=None, metavar="MAP",
                   help="also write the voxel entropy in [0, 1] on the input grid to MAP (implies --uncertainty)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip test-time augmentation for the uncertainty (3 more passes; implies --uncertainty)")
    p.add_argument("--truth", default=None, help="ground-truth label map: print per-label Dice after segmenting")
    from vocoslicer.infer.batch_cli import add_batch_arguments

    add_batch_arguments(p)  # several inputs / --cohort / an output folder: batch mode; .dcm: DICOM SEG
    add_runtime_flags(p)
    add_events_argument(p)  # --events stdout: JSON-lines events on stdout for a parent process (the GUI)
    config.add_config_option(p)
    p.set_defaults(func=run, validate=validate)


def validate(args: argparse.Namespace) -> None:
    """Argument checks before any work (a 20 s inference must not end in "cannot write"): overlap, device, the
    output (format, folder, not the input, its .labels.csv not a folder). Batch mode checks each case itself."""
    import math
    from pathlib import Path

    from vocoslicer.commands._jobsetup import check_device
    from vocoslicer.infer import batch_cli
    from vocoslicer.infer.segment import labels_csv_path
    from vocoslicer.io import check_output_path

    if args.overlap is not None and not (math.isfinite(args.overlap) and 0 <= args.overlap < 1):
        raise UserError(f"--overlap must be in [0, 1), got {args.overlap}")
    check_device(args.device)
    from vocoslicer.infer.runtime import check_runtime

    check_runtime(args.runtime)
    if batch_cli.is_batch(args):
        return
    if not args.input or not args.output:
        raise UserError("segment needs an input and -o OUTPUT (see 'vocoslicer segment --help')")
    if not Path(args.input).exists():
        raise UserError(f"{args.input}: no such file or folder")
    inputs = [args.input, *([args.truth] if args.truth else [])]
    if batch_cli.wants_dicom_seg(args):
        check_output_path(args.output, inputs=inputs, extensions=(".dcm",))
    else:
        check_output_path(args.output, inputs=inputs, sidecars=[labels_csv_path(args.output)])
    if args.truth and not Path(args.truth).is_file():
        raise UserError(f"--truth {args.truth}: no such file")


def run(args: argparse.Namespace) -> int:
    """Handler: segment and report."""
    from vocoslicer.infer import batch_cli
    from vocoslicer.infer.segment import run_segment

    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be in [0, 1), got {args.overlap}")
    if batch_cli.is_batch(args):
        return batch_cli.run_batch_command(args)
    if not args.input or not args.output:
        raise UserError("segment needs an input and -o OUTPUT (see 'vocoslicer segment --help')")
    if batch_cli.wants_dicom_seg(args):
        return batch_cli.run_single_dicom_seg(args)
    if args.out_format not in (None, "nifti", "nrrd", "seg.nrrd", "mha"):
        raise UserError(f"--format {args.out_format} does not match the output name {args.output}")
    result = run_segment(args.input, args.output, args.model, args.device, args.fast, args.series, args.overlap,
                         largest_component=args.largest_component, runtime=args.runtime, threads=args.threads,
                         uncertainty=args.uncertainty, uncertainty_map=args.uncertainty_map,
                         tta=args.tta)  # events: the job context's (--run-dir/--events)
    out = sys.stderr if args.events == "stdout" else sys.stdout
    print(f"wrote {result['output']} and {result['labels']} ({result['model']}, {result['seconds']:.1f} s)", file=out)
    if "uncertainty" in result:
        print(f"uncertainty {result['uncertainty']:.4f} (details: {result['uncertainty_json']})", file=out)
    if args.truth:
        print_dice(result["output"], args.truth, result["labels"], out)
    return 0


def print_dice(pred_path: str, truth_path: str, labels_csv: str, out=sys.stdout) -> float:  # noqa: ANN001
    """Print a per-label Dice table of a segmentation against ground truth; returns the mean."""
    import SimpleITK as sitk

    from vocoslicer.io import read_image, same_grid
    from vocoslicer.labels import LabelTable
    from vocoslicer.metrics import dice_per_label, mean_dice

    pred, truth = read_image(pred_path), read_image(truth_path)
    if not same_grid(pred, truth):
        raise UserError(f"{truth_path}: the ground truth is not on the input's grid")
    table = LabelTable.read_csv(labels_csv)
    scores = dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth), table.values)
    width = max(len(lb.name) for lb in table)
    print(f"{'label':<{width}}  Dice", file=out)
    for lb in table:
        print(f"{lb.name:<{width}}  {scores[lb.value]:.3f}", file=out)
    m = mean_dice(scores)
    print(f"{'mean':<{width}}  {m:.3f}", file=out)
    return m
