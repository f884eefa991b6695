"""Train the bundled demo model: a small VoCo-family SwinUNETR segmenting the 8 phantom structures.

This is how ``VoCoSlicer/vocoslicer/resources/demo_model`` was made (see its README.md for the exact command,
seeds and held-out Dice). It uses the project's own training code (:mod:`vocoslicer.train.segmentation` on the
shared :class:`vocoslicer.train.loop.Trainer`) and the project's phantoms, so anyone can reproduce it on a CPU.

    python scripts/train_demo_model.py --steps 600 --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.errors import Cancelled
from vocoslicer.infer.segment import segment_image
from vocoslicer.jobs.events import EventSink
from vocoslicer.metrics import dice_per_label, mean_dice
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model
from vocoslicer.models.installed import DEMO_MODEL_ID
from vocoslicer.train.loop import TrainConfig, Trainer
from vocoslicer.train.segmentation import (
    CropStream,
    SegCase,
    best_bundle_writer,
    dice_ce_step,
    make_eval_fn,
    prepare_case,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "VoCoSlicer" / "vocoslicer" / "resources" / "demo_model"
ARCH_ARGS = {"size": None, "feature_size": 12, "in_channels": 1, "out_channels": len(PHANTOM_LABELS) + 1,
             "patch_merging": "legacy"}
PREPROCESSING = {"orientation": "RAS", "spacing": [3.0, 3.0, 3.0],
                 "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "pad_value": -1024}
INFERENCE = {"roi_size": [64, 64, 64], "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 4}


def phantom_cases(seeds: list[int], random_orientation: bool) -> list[SegCase]:
    """Phantoms at their random (often anisotropic) spacing, optionally in random axis orders."""
    cases = []
    for s in seeds:
        ph = generate_phantom(s, random_orientation=random_orientation)
        cases.append(SegCase(f"phantom_{s}", ph.image, ph.label))
    return cases


def held_out_dice(bundle: ModelBundle, seeds: list[int]) -> dict[str, float]:
    """Dice per label on full-resolution held-out phantoms, through the real inference pipeline."""
    model = bundle.build_model().eval()
    per: dict[int, list[float]] = {lb.value: [] for lb in PHANTOM_LABELS}
    for s in seeds:
        ph = generate_phantom(s, random_orientation=True)
        pred = segment_image(ph.image, bundle, model=model, device="cpu")
        scores = dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ph.label), per)
        for v, d in scores.items():
            per[v].append(d)
        print(f"  held-out seed {s}: mean Dice {mean_dice(scores):.3f}", flush=True)
    out = {PHANTOM_LABELS.by_value(v).name: float(np.mean(d)) for v, d in per.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def model_card(args: argparse.Namespace, meta: dict, held: dict[str, float], seconds: float) -> str:
    """The README.md of the bundle: how it was made and how good it is, in numbers."""
    crops = "centred on each class equally often" if args.sampler == "classes" else "pos/neg 1:1"
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in held.items())
    return f"""# VoCoSlicer demo model ({DEMO_MODEL_ID} v{meta['version']})

A small VoCo-family segmentation network (MONAI SwinUNETR-v2, feature_size 12, legacy patch merging as in the
official VoCo weights, 1 input channel, {ARCH_ARGS['out_channels']} outputs) that
segments the 8 structures of the VoCoSlicer synthetic CT phantom: {', '.join(lb.name for lb in PHANTOM_LABELS)}.
It exists so that a fresh install can segment something at once and so that the tests have a real trained
model; it has never seen a real CT and must not be used on patient data.

## How it was trained
- Command: `python scripts/train_demo_model.py --steps {args.steps} --train-seeds {args.train_seeds} \\
  --val-seeds {args.val_seeds} --test-seeds {args.test_seeds} --lr {args.lr} --batch {args.batch} \\
  --sampler {args.sampler}{' --init-from ' + args.init_from if args.init_from else ''}`
- Initialised from: {meta.get('training', {}).get('init_from', 'random weights (torch seed 0)')}.
- Data: phantoms `vocoslicer.data.phantom.generate_phantom(seed, random_orientation=True)`, training seeds
  {args.train_seeds}, validation seeds {args.val_seeds} (model selection), held-out test seeds {args.test_seeds}.
- Preprocessing: RAS, {PREPROCESSING['spacing']} mm, HU window -1000..1000 → 0..1. Crops 64³ ({crops}),
  batch {args.batch}, DiceCE, AdamW lr {args.lr} (amsgrad), warmup {args.warmup} steps then cosine, CPU fp32.
- Training {meta.get('training', {}).get('stopped')}; best validation step {meta.get('metrics', {}).get('step')}:
  val Dice {meta.get('metrics', {}).get('val_dice')}.
  Training took {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads.

## Held-out Dice (full-resolution phantoms, seeds {args.test_seeds}, through `vocoslicer segment`'s pipeline)
| label | Dice |
|---|---|
{rows}
"""


def main() -> int:
    """Train, select on validation Dice, evaluate on held-out phantoms, write the bundle + card."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--train-seeds", default="0-19")
    ap.add_argument("--val-seeds", default="100-101")
    ap.add_argument("--test-seeds", default="1000-1002")
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "demo_model"))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--version", default="1.0.0", help="version written into the bundle")
    ap.add_argument("--init-from", default=None,
                    help="start from this bundle's weights (continue training an earlier demo model)")
    ap.add_argument("--sampler", choices=("classes", "posneg"), default="classes",
                    help="crop centres: every class equally often (default) or foreground/background 1:1")
    args = ap.parse_args()

    def seeds(spec: str) -> list[int]:
        a, _, b = spec.partition("-")
        return list(range(int(a), int(b or a) + 1))

    t0 = time.time()
    channel_values = [0, *PHANTOM_LABELS.values]
    meta = new_bundle_meta(DEMO_MODEL_ID, args.version, "segmentation", "swinunetr", ARCH_ARGS,
                           name="VoCoSlicer demo (phantom abdomen, 8 structures)",
                           preprocessing=PREPROCESSING, inference=INFERENCE, channel_values=channel_values,
                           parent=None, license="Apache-2.0",
                           training={"data": "vocoslicer synthetic phantoms", "train_seeds": args.train_seeds,
                                     "val_seeds": args.val_seeds, "steps": args.steps,
                                     "command": " ".join(sys.argv)})
    template = ModelBundle(meta=meta, labels=PHANTOM_LABELS)
    print("preparing phantoms ...", flush=True)
    train = [prepare_case(c, PREPROCESSING, channel_values) for c in phantom_cases(seeds(args.train_seeds), True)]
    val = [prepare_case(c, PREPROCESSING, channel_values) for c in phantom_cases(seeds(args.val_seeds), True)]
    torch.manual_seed(0)
    model = build_model("swinunetr", ARCH_ARGS)
    if args.init_from:
        start = ModelBundle.load(args.init_from)
        model.load_state_dict(start.state_dict())
        st = start.meta.get("training", {})
        meta["training"]["init_from"] = (f"{start.meta['id']} v{start.meta['version']} ({st.get('stopped', '?')}, "
                                         f"sampler {st.get('sampler', 'posneg')}; its command: "
                                         f"`{st.get('command', '?')}`)")
    meta["training"]["sampler"] = args.sampler
    ratios = [1.0] * len(channel_values) if args.sampler == "classes" else None
    run_dir = Path(args.run_dir)
    best_dir = run_dir / "best_bundle"
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, amp="off", ckpt_every=args.eval_every,
                      eval_every=args.eval_every, log_every=10, seed=0, device="cpu", select_metric="val_dice")
    events = EventSink(run_dir / "events.jsonl", stdout=True)
    trainer = Trainer(model, cfg, run_dir, dice_ce_step(), CropStream(train, INFERENCE["roi_size"], args.batch,
                                                                   class_ratios=ratios),
                      eval_fn=make_eval_fn(val, PHANTOM_LABELS, channel_values, INFERENCE["roi_size"]),
                      events=events, on_best=best_bundle_writer(template, best_dir))
    try:
        result = trainer.fit(resume=args.resume)
        stopped = f"{result['stopped']} at step {result['step']}"
    except Cancelled:  # SIGTERM/Ctrl-C: keep the best bundle so far (the card says where training stopped)
        stopped = f"stopped by request at step {trainer.step}"
    meta_stop = {"stopped": stopped}
    print(f"training {stopped}; best val_dice {trainer.best} at step {trainer.best_step}", flush=True)
    best = ModelBundle.load(best_dir)
    held = held_out_dice(best, seeds(args.test_seeds))
    meta = dict(best.meta)
    meta["training"] = {**meta.get("training", {}), **meta_stop}
    meta["evaluation"] = {"held_out_seeds": args.test_seeds, "dice": {k: round(v, 4) for k, v in held.items()}}
    out = Path(args.out)
    ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(out, best.state_dict(), dtype=torch.float16,
                                                       card=model_card(args, meta, held, time.time() - t0),
                                                       overwrite=True)
    shutil.copy(out / "README.md", run_dir / "MODEL_CARD.md")
    print(json.dumps(held, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
