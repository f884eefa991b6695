"""``vocoslicer phantom``: write synthetic CT phantoms (image + truth + labels table) for demos, tests, training."""

from __future__ import annotations

import argparse

from vocoslicer.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``phantom`` command."""
    p = sub.add_parser("phantom", help="write synthetic abdominal CT phantoms with their truth label maps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    p.add_argument("--count", type=int, default=1, help="write seeds SEED .. SEED+COUNT-1 (default 1)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel spacing in mm (default: random per seed, anisotropic slices)")
    p.add_argument("--size", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                   help="grid size in voxels, centred on the body (default: covers the abdomen)")
    p.add_argument("--random-orientation", action="store_true",
                   help="permute/flip the array axes (direction matrix keeps the anatomy in place)")
    p.add_argument("--noise", type=float, default=None, metavar="HU", help="noise SD in HU (default: random 10-20)")
    p.add_argument("--finding", choices=("none", "splenomegaly", "liver_lesion"), default=None,
                   help="case-level finding with known truth (also writes phantom_<seed>_finding.json)")
    p.add_argument("--format", default=".nii.gz", choices=(".nii.gz", ".nii", ".nrrd", ".mha"),
                   help="image file format (default .nii.gz)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vocoslicer.data.phantom import MIN_SIZE, generate_phantom, write_phantom

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    if args.spacing is not None and not all(s > 0 and s == s and s != float("inf") for s in args.spacing):
        raise UserError(f"--spacing must be finite and > 0 mm, got {' '.join(map(str, args.spacing))}")
    if args.size is not None and min(args.size) < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} voxels per axis, got {' '.join(map(str, args.size))}")
    if args.noise is not None and not args.noise >= 0:
        raise UserError(f"--noise must be >= 0 HU, got {args.noise}")
    printed = set()
    for seed in range(args.seed, args.seed + args.count):
        ph = generate_phantom(seed, spacing=args.spacing, size=args.size,
                              random_orientation=args.random_orientation, noise_hu=args.noise,
                              finding=args.finding)
        for path in write_phantom(ph, args.output, args.format).values():
            if path not in printed:  # the shared labels table once, not once per seed
                printed.add(path)
                print(path, flush=True)
    return 0
