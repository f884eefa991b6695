"""Active learning on phantoms: does choosing which case to correct beat choosing at random?

The simulated loop is the product's own: one cohort per (strategy, seed) holds a pool of unlabelled phantoms and a
fixed held-out set (labelled, ``split=val``, frozen by the first finetune as the cohort's evaluation split). Each
round ``vocoslicer cohort rank`` (``rank_cohort``) orders the pool with the current model, the top cases are
"corrected" with their true label maps (``Cohort.add_label``), ``finetune`` continues from the current model, and
its recorded Dice on the fixed split is read back with ``cohort curve`` (``cohort_curve``). Labelled counts
``--ks`` (default 1, 2, 4, 8); strategies random, uncertainty, diversity (optionally hybrid); seeds set the start
model, the random picks, diversity's first pick and the finetune.

The same seed gives every strategy the same random start model, so gaps to random are paired: the table shows the
mean Dice over seeds (± standard deviation) and the mean paired gap to random (± its standard deviation).

CPU size (MONAI UNet bundle, 8 mm spacing, tens of steps per round):

    python benchmarks/bench_active_learning.py --pool 16 --held 3 --ks 1,2,4,8 --steps 40 --seeds 0,1,2

GPU size (VoCo-B SwinUNETR, 1.5 mm, 96³ crops): ``--arch swinunetr --spacing 1.5 --roi 96 --steps 300``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_curve import cohort_curve
from vocoslicer.data.cohort_rank import rank_cohort
from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model
from vocoslicer.train.finetune import FinetuneOptions, run_finetune

STRATEGIES = ("random", "uncertainty", "diversity")


def ints(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]."""
    return [int(v) for v in text.split(",") if v]


def start_bundle(path: Path, a: argparse.Namespace, seed: int) -> Path:
    """A randomly initialised bundle (seeded): every strategy of one seed starts from the same weights."""
    if (path / "model.json").is_file():
        return path
    torch.manual_seed(seed)
    nc = 1 + len(PHANTOM_LABELS)
    if a.arch == "unet":
        args = {"in_channels": 1, "out_channels": nc, "channels": [8, 16, 32], "strides": [2, 2],
                "num_res_units": 1}
    else:
        args = {"size": "B", "feature_size": None, "in_channels": 1, "out_channels": nc, "patch_merging": "legacy"}
    pre = {"orientation": "RAS", "spacing": [a.spacing] * 3, "pad_value": -1024,
           "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
    meta = new_bundle_meta(f"al-start-s{seed}", "1.0.0", "segmentation", a.arch, args, preprocessing=pre,
                           inference={"roi_size": [a.roi] * 3, "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 2}, channel_values=[0, *PHANTOM_LABELS.values])
    return ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(path, build_model(a.arch, args).state_dict())


def run_one(work: Path, strategy: str, seed: int, a: argparse.Namespace) -> list[tuple[int, float]]:
    """One simulated loop; returns (labelled cases, fixed-split Dice) per round."""
    root = work / f"{strategy}-s{seed}"
    done = root / "curve.json"
    if done.is_file():
        return [tuple(x) for x in json.loads(done.read_text())]  # type: ignore[misc]
    shutil.rmtree(root, ignore_errors=True)  # an interrupted loop restarts from its first round
    cohort = Cohort.init(root / "cohort", val_ratio=0.0)  # corrected pool cases train; held-out cases are val
    truth = {}
    for s in range(a.pool):
        ph = generate_phantom(1000 + s, spacing=(a.spacing,) * 3)
        cid = f"p{s:02d}"
        cohort.add(ph.image, case_id=cid)
        truth[cid] = ph.label
    for s in range(a.held):
        ph = generate_phantom(5000 + s, spacing=(a.spacing,) * 3)
        cohort.add(ph.image, ph.label, PHANTOM_LABELS, case_id=f"h{s:02d}", split="val")
    model = str(start_bundle(work / f"start-s{seed}", a, seed))
    have = 0
    for k in a.ks:
        picks = rank_cohort(cohort.root, model, strategy, n=k - have, seed=seed + 17 * k, device=a.device)["ranking"]
        for r in picks:
            cohort.add_label(r["case"], truth[r["case"]])
        have = k
        s = run_finetune(FinetuneOptions(cohort.root, model, root / f"run-k{k}", steps=a.steps, lr=a.lr,
                                         batch=2, semi=False, eval_every=a.steps, device=a.device, amp="off",
                                         seed=seed, model_id=f"al-{strategy}-s{seed}"))
        model = s["installed"]
        print(f"  {strategy:12s} seed {seed} k={k}: picked {[r['case'] for r in picks]}, "
              f"best {s['best_val_dice']:.3f}", flush=True)
    rows = [(r["n_labelled"], float(r["val_dice"])) for r in cohort_curve(cohort.root)]
    done.write_text(json.dumps(rows))
    return rows


def table(results: dict[str, dict[int, list[tuple[int, float]]]], ks: list[int], seeds: list[int]) -> str:
    """Markdown: mean ± sd Dice per strategy and k, and the paired gap to random."""
    strategies = list(results)
    dice = {st: {k: np.array([dict(results[st][sd])[k] for sd in seeds]) for k in ks} for st in strategies}
    head = "| k | " + " | ".join(strategies) + " | " + " | ".join(f"{st} − random" for st in strategies
                                                                 if st != "random") + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(strategies) - 1)]
    for k in ks:
        cells = [f"{dice[st][k].mean():.3f} ± {dice[st][k].std(ddof=1) if len(seeds) > 1 else 0:.3f}"
                 for st in strategies]
        gaps = []
        for st in strategies:
            if st == "random":
                continue
            g = dice[st][k] - dice["random"][k]
            gaps.append(f"{g.mean():+.3f} ± {g.std(ddof=1) if len(seeds) > 1 else 0:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def main() -> int:
    """Run every (strategy, seed) loop (resumable: finished loops are reused) and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/vocoslicer-bench-al", help="work folder (reused: finished loops skip)")
    p.add_argument("--pool", type=int, default=16, help="unlabelled phantoms in the pool")
    p.add_argument("--held", type=int, default=3, help="held-out phantoms (the fixed validation split)")
    p.add_argument("--ks", type=ints, default=[1, 2, 4, 8], help="labelled cases after each round")
    p.add_argument("--steps", type=int, default=40, help="finetune steps per round")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--arch", choices=("unet", "swinunetr"), default="unet")
    p.add_argument("--spacing", type=float, default=8.0)
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    work = Path(a.work)
    os.environ.setdefault("VOCOSLICER_HOME", str(work / "home"))  # installed versions stay out of the user's
    strategies = [s for s in a.strategies.split(",") if s]
    if "random" not in strategies:
        strategies.insert(0, "random")
    t0 = time.time()
    results: dict[str, dict[int, list[tuple[int, float]]]] = {st: {} for st in strategies}
    for seed in a.seeds:
        for st in strategies:
            results[st][seed] = run_one(work, st, seed, a)
    minutes = (time.time() - t0) / 60
    dev = "CPU" if a.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"\n{dt.date.today()} — {dev} ({platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}; {a.arch}, {a.spacing} mm, pool {a.pool}, held-out {a.held}, "
          f"{a.steps} steps/round, seeds {a.seeds}; {minutes:.1f} min")
    print(table(results, a.ks, a.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
