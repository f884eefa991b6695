"""Label efficiency on phantoms: scratch vs VoCo-pretrained vs pretrained + semi-supervised, k labelled cases.

For each k (labelled training cases) and each seed, one cohort holds k labelled phantoms, one validation phantom
(fixed split) and U unlabelled phantoms. Three finetunes run with the same steps and learning rate:

- ``scratch``: random SwinUNETR, supervised only (the baseline);
- ``voco``: encoder from ``vocoslicer pretrain voco`` on the U unlabelled phantoms, supervised only;
- ``voco+semi``: the same start, plus the confident pseudo-label stage on the unlabelled cases;
- ``voco+semi+ssl`` (optional): also the VoCo loss on unlabelled crops during finetuning (``--ssl-weight 1``).

Every resulting bundle segments held-out test phantoms through the real inference pipeline; the table shows the
mean Dice over labels and test cases, averaged over seeds, and each method's ratio to ``scratch``.

    python benchmarks/bench_label_efficiency.py --ks 1,2,4,8 --unlabelled 32 --seeds 3 --steps 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.infer.segment import segment_image
from vocoslicer.metrics import dice_per_label, mean_dice
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.train.finetune import FinetuneOptions, run_finetune

METHODS = ("scratch", "voco", "voco+semi")
OPTIONAL_METHODS = ("voco+semi+ssl",)  # --methods ...,voco+semi+ssl: also the VoCo loss on unlabelled crops


def ints(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]."""
    return [int(v) for v in text.split(",") if v]


def pretrain(work: Path, unl_dir: Path, a: argparse.Namespace) -> Path:
    """Run the real ``vocoslicer pretrain voco`` CLI on the unlabelled phantoms; returns the backbone bundle."""
    run = work / "pretrain"
    if (run / "backbone" / "model.json").is_file():
        return run / "backbone"
    cmd = [sys.executable, "-m", "vocoslicer", "pretrain", "voco", "--data", str(unl_dir), "--out", str(run),
           "--feature-size", str(a.feature_size), "--steps", str(a.pretrain_steps), "--batch", "2", "--sw", "2",
           "--crop", str(a.roi[0]), "--depth", str(a.roi[2]), "--grid", str(a.grid),
           "--spacing", str(a.spacing), "--window=-1000,1000", "--device",
           a.device, "--amp", "off" if a.device == "cpu" else "auto", "--seed", "0", "--workers", "0"]
    print("pretraining:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run / "backbone"


def test_dice(bundle_dir: Path, test_seeds: list[int], spacing: float, device: str = "cpu") -> float:
    """Mean Dice over labels and test phantoms, through the inference pipeline."""
    bundle = ModelBundle.load(bundle_dir)
    model = bundle.build_model().eval().to(device)
    scores = []
    for s in test_seeds:
        ph = generate_phantom(s, spacing=(spacing,) * 3)
        pred = segment_image(ph.image, bundle, model=model, device=device)
        per = dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ph.label),
                             PHANTOM_LABELS.values)
        scores.append(mean_dice(per))
    return float(np.mean(scores))


def main() -> int:
    """Build cohorts, pretrain once, finetune 3 ways per (k, seed), print and save the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--unlabelled", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="finetune steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--spacing", type=float, default=4.0, help="phantom and model spacing in mm")
    ap.add_argument("--roi", default="64,64,64", help="finetune ROI X,Y,Z = VoCo crop (X) and depth (Z)")
    ap.add_argument("--grid", type=int, default=2, help="VoCo base-crop grid of the pretraining")
    ap.add_argument("--feature-size", type=int, default=12)
    ap.add_argument("--test-cases", type=int, default=2)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS + OPTIONAL_METHODS)}; the first is the ratios' baseline")
    ap.add_argument("--work", default="runs/bench_label_efficiency")
    ap.add_argument("--results-md", default=None, help="append the table to this markdown file")
    a = ap.parse_args()
    a.roi = ints(a.roi)
    if len(a.roi) != 3 or a.roi[0] != a.roi[1]:
        ap.error("--roi: three sizes, X = Y (VoCo crops are square in-plane)")
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS + OPTIONAL_METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    import os

    os.environ.setdefault("VOCOSLICER_HOME", str(work / "home"))
    pre = {"orientation": "RAS", "spacing": [a.spacing] * 3, "pad_value": -1024,
           "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
    unl_seeds = list(range(5000, 5000 + a.unlabelled))
    test_seeds = list(range(9000, 9000 + a.test_cases))
    unl_dir = work / "unlabelled"
    unl_dir.mkdir(exist_ok=True)
    for s in unl_seeds:
        f = unl_dir / f"phantom_{s}.nii.gz"
        if not f.is_file():
            sitk.WriteImage(generate_phantom(s, spacing=(a.spacing,) * 3).image, str(f))
    t0 = time.time()
    backbone = pretrain(work, unl_dir, a) if any(m.startswith("voco") for m in methods) else None
    t_pre = time.time() - t0
    results: dict[str, dict[int, list[float]]] = {m: {k: [] for k in ints(a.ks)} for m in methods}
    for seed in range(a.seeds):
        for k in ints(a.ks):
            cdir = work / f"cohort_k{k}_s{seed}"
            if not (cdir / "manifest.json").is_file():
                c = Cohort.init(cdir)
                for i in range(k + 1):  # k training cases + 1 validation case
                    ph = generate_phantom(1000 * seed + i, spacing=(a.spacing,) * 3)
                    c.add(ph.image, ph.label, PHANTOM_LABELS, split="val" if i == k else "train")
                for s in unl_seeds:
                    c.add(unl_dir / f"phantom_{s}.nii.gz")
            for m in methods:
                out = work / f"ft_{m}_k{k}_s{seed}"
                if not (out / "summary.json").is_file():
                    init = "scratch" if m == "scratch" else str(backbone)
                    opts = FinetuneOptions(cohort=cdir, init=init, out=out, steps=a.steps, lr=a.lr, batch=a.batch,
                                           roi=a.roi, semi=m.startswith("voco+semi"), confidence=a.confidence,
                                           ssl_weight=1.0 if m.endswith("+ssl") else 0.0,
                                           eval_every=max(1, a.steps // 5), device=a.device, seed=seed,
                                           amp="off" if a.device == "cpu" else "auto",
                                           model_id=f"bench-{m.replace('+', '-')}", feature_size=a.feature_size,
                                           preprocessing=pre, install=False)
                    run_finetune(opts)
                d = test_dice(out / "best_bundle", test_seeds, a.spacing, a.device)
                results[m][k].append(d)
                print(f"k={k} seed={seed} {m:10s} test Dice {d:.3f}", flush=True)
    header = "| k | " + " | ".join(methods) + " | " + " | ".join(f"{m}/scratch" for m in methods[1:]) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(methods) - 1)]
    for k in ints(a.ks):
        means = [float(np.mean(results[m][k])) for m in methods]
        ratios = [f"{mv / means[0]:.2f}" if means[0] > 0 else "n/a" for mv in means[1:]]
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in means) + " | " + " | ".join(ratios) + " |")
    table = "\n".join(lines)
    print(table)
    (work / "results.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    if a.results_md:
        cmd = "python benchmarks/bench_label_efficiency.py " + " ".join(sys.argv[1:])
        with open(a.results_md, "a", encoding="utf-8") as fh:
            fh.write(f"\n## Label efficiency (issue 5)\n\n{dt.date.today()}, {platform.processor() or 'CPU'} "
                     f"({torch.get_num_threads()} threads), `{cmd}`; pretraining {t_pre:.0f} s; mean test Dice over "
                     f"8 labels × {a.test_cases} held-out phantoms, mean of {a.seeds} seed(s).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
