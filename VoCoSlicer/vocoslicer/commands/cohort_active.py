"""``vocoslicer cohort rank`` (which case to correct next) and ``vocoslicer cohort curve`` (what each bought)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _rank(args: argparse.Namespace) -> int:
    from vocoslicer.data.cohort_rank import rank_cohort
    from vocoslicer.jobs import current_job

    job = current_job()
    result = rank_cohort(args.cohort, args.model, args.strategy, args.n, args.seed, args.alpha, args.device,
                         args.fast, events=job.events, cancel=job.should_stop)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['strategy']} ranking of {result['n_candidates']} unlabelled cases ({result['n_labelled']} "
          f"labelled) with {result['model']}@{result['model_version']}, seed {result['seed']}")
    print(f"{'rank':>4}  {'case':12s} {'score':>8}  {'uncertainty':>11}")
    for r in result["ranking"]:
        u = "-" if r["uncertainty"] is None else f"{r['uncertainty']:.4f}"
        print(f"{r['rank']:>4}  {r['case']:12s} {r['score']:>8.4f}  {u:>11}")
    return 0


def _curve(args: argparse.Namespace) -> int:
    from vocoslicer.data.cohort_curve import cohort_curve, curve_csv, write_curve_png
    from vocoslicer.io import atomic_write_text

    rows = cohort_curve(args.cohort)
    root = Path(args.cohort).expanduser().resolve()
    csv_path = Path(args.csv) if args.csv else root / "curve" / "curve.csv"
    text = curve_csv(rows)
    atomic_write_text(csv_path, text)
    png = write_curve_png(rows, Path(args.png) if args.png else csv_path.with_suffix(".png"))
    if args.json:
        print(json.dumps({"csv": str(csv_path), "png": str(png) if png else None, "rows": rows}, indent=2))
        return 0
    print(f"{'labelled':>8}  {'val Dice':>8}  {'n_val':>5}  version")
    for r in rows:
        d = "-" if math.isnan(float(r["val_dice"])) else f"{r['val_dice']:.4f}"
        print(f"{r['n_labelled']:>8}  {d:>8}  {r['n_val']:>5}  {r['id']}@{r['version']}")
    print(f"wrote {csv_path}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    if not png:
        sys.stderr.write("vocoslicer: warning: matplotlib is not installed; wrote the CSV only\n")
    return 0


# = vocoslicer.data.cohort_rank.STRATEGIES, spelled out so that building the CLI imports no numpy/SimpleITK
STRATEGIES = ("uncertainty", "diversity", "random", "hybrid")


def register(verbs: argparse._SubParsersAction) -> None:
    """Add ``rank`` and ``curve`` to the ``cohort`` verbs."""
    v = verbs.add_parser("rank", help="order the unlabelled cases: which one to correct next",
                         description="Segments (or reuses the cached scores of) the unlabelled cases with --model "
                                     "and prints them best first; stored in COHORT/ranking/latest.json.")
    v.add_argument("cohort")
    v.add_argument("--model", required=True, help="bundle path, installed model ID or ID@VERSION")
    v.add_argument("--strategy", choices=STRATEGIES, default="uncertainty",
                   help="uncertainty (default), diversity (k-centre greedy on pooled encoder features), hybrid "
                        "(both, --alpha), random (the baseline)")
    v.add_argument("-n", type=int, default=None, help="list only the first N cases")
    v.add_argument("--seed", type=int, default=0, help="seed of random and of diversity's first pick")
    v.add_argument("--alpha", type=float, default=0.5, help="hybrid: weight of uncertainty vs distance (0..1)")
    v.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    v.add_argument("--fast", action="store_true", help="score at 3 mm spacing (faster, coarser)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_rank)

    v = verbs.add_parser("curve", help="validation Dice against labelled cases over the cohort's model versions")
    v.add_argument("cohort")
    v.add_argument("--csv", help="CSV output (default COHORT/curve/curve.csv)")
    v.add_argument("--png", help="PNG plot (default: next to the CSV)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_curve)
