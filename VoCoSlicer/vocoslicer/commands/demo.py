"""``vocoslicer demo``: the embedded default job — segment a held-out phantom CT with the bundled demo model.

It exercises the whole path a user's CT takes (read → RAS/spacing/window → sliding window → back onto the
exact input grid → atomic write) and prints Dice against the phantom's ground truth, so a fresh install proves
itself in one command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser("demo", help="segment a generated phantom CT with the bundled demo model and print Dice")
    p.add_argument("-o", "--output-dir", default="demo_output", help="where to write the files (default ./demo_output)")
    p.add_argument("--seed", type=int, default=1000, help="phantom seed (default 1000, held out from training)")
    p.add_argument("--model", default=None, help="bundle path or installed ID (default: the demo model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--fast", action="store_true", help="segment at 3 mm spacing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler: phantom → segmentation → Dice table."""
    from vocoslicer.commands.segment import print_dice
    from vocoslicer.data.phantom import generate_phantom, write_phantom
    from vocoslicer.infer.segment import run_segment
    from vocoslicer.jobs.events import EventSink

    out = Path(args.output_dir)
    ph = generate_phantom(args.seed, random_orientation=True)
    files = write_phantom(ph, out)
    sp = ", ".join(f"{s:.2f}" for s in ph.image.GetSpacing())
    print(f"phantom CT (seed {args.seed}, size {ph.image.GetSize()}, spacing {sp} mm): {files['image']}")
    seg_path = out / f"phantom_{args.seed}_segmentation.nii.gz"
    result = run_segment(str(files["image"]), str(seg_path), args.model, args.device, args.fast,
                         events=EventSink())
    print(f"segmentation: {result['output']} (labels: {result['labels']}), {result['model']}, "
          f"{result['seconds']:.1f} s")
    mean = print_dice(result["output"], str(files["label"]), result["labels"], sys.stdout)
    return 0 if mean == mean else 1  # NaN mean = nothing to compare, a failure of the demo
