"""Classification label efficiency on phantoms: VoCo-initialised vs scratch classifier, k labelled cases.

Task: splenomegaly vs normal (``vocoslicer phantom --finding``), balanced. For each k (labelled training cases), one
cohort holds k training phantoms and a fixed validation set; two finetunes of the official VoCo classifier
(``finetune --task classification``: SwinUNETR-v2 encoder+decoder, average pool, linear) run with the same steps:

- ``scratch``: random weights;
- ``voco``: the encoder from VoCo pretraining: ``--voco-init`` (a VoCo checkpoint such as VoCo_B_SSL_head.pt or an
  installed ``voco-b-ssl``), or else ``vocoslicer pretrain voco`` on ``--unlabelled`` phantoms run here.

Each best bundle classifies held-out test phantoms through the real inference path (``classify_image``); the table
shows test accuracy and ROC AUC (MONAI), and the ratio of VoCo to scratch accuracy in the same run.

    python benchmarks/bench_classify.py --ks 4,8,16 --device cuda --results-md benchmarks/RESULTS.md
    python benchmarks/bench_classify.py --cpu-reduced --results-md benchmarks/RESULTS.md   # this CPU
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

import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_classes import set_classes
from vocoslicer.data.phantom import generate_phantom, write_phantom
from vocoslicer.infer.classify import classify_image
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.train.finetune import ClsOptions, run_classification_finetune

TRAIN0, VAL0, TEST0, UNL0 = 0, 5000, 6000, 7000  # seed ranges of the four phantom sets


def finding(seed: int) -> str:
    """Balanced classes: odd seeds have splenomegaly."""
    return "splenomegaly" if seed % 2 else "none"


def grid(a: argparse.Namespace) -> dict:
    """Phantom grid: the model spacing, covering the abdomen."""
    s = a.spacing
    return {"spacing": (s, s, s), "size": (int(352 / s), int(288 / s), int(256 / s))}


def pretrain(work: Path, a: argparse.Namespace) -> Path:
    """``vocoslicer pretrain voco`` on unlabelled phantoms (no finding information used); returns the backbone."""
    run = work / "pretrain"
    if (run / "backbone" / "model.json").is_file():
        return run / "backbone"
    unl = work / "unlabelled"
    for s in range(UNL0, UNL0 + a.unlabelled):
        write_phantom(generate_phantom(s, finding=finding(s), **grid(a)), unl)
    for p in unl.glob("*_truth*"):
        p.unlink()
    crop = a.input_size[0]  # the VoCo crop is square in-plane and at least 64 (SwinUNETR trains on > 1 voxel)
    cmd = [sys.executable, "-m", "vocoslicer", "pretrain", "voco", "--data", str(unl), "--out", str(run),
           "--feature-size", str(a.feature_size), "--steps", str(a.pretrain_steps), "--batch", "2", "--sw", "2",
           "--crop", str(crop), "--depth", str(a.input_size[2]), "--grid", "2", "--spacing", str(a.spacing),
           "--device", a.device, "--amp", "off" if a.device == "cpu" else "auto", "--seed", "0", "--workers", "0"]
    print("pretraining:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run / "backbone"


def cohort_for(work: Path, k: int, a: argparse.Namespace) -> Cohort:
    """k training phantoms (half with the finding) + the fixed validation phantoms."""
    root = work / f"cohort_k{k}"
    if (root / "manifest.json").is_file():
        return Cohort(root)
    c = Cohort.init(root)
    for s in [*range(TRAIN0, TRAIN0 + k), *range(VAL0, VAL0 + a.val_cases)]:
        cid = c.add(generate_phantom(s, finding=finding(s), **grid(a)).image,
                    split="val" if s >= VAL0 else "train").case_id
        set_classes(c, cid, ["splenomegaly" if s % 2 else "normal"], allow_new=True)
    return c


def test_metrics(bundle_dir: Path, a: argparse.Namespace) -> tuple[float, float]:
    """(accuracy, ROC AUC of splenomegaly) on the held-out test phantoms, through classify_image."""
    from monai.metrics import compute_roc_auc

    bundle = ModelBundle.load(bundle_dir)
    model = None
    probs, truth, correct = [], [], 0
    for s in range(TEST0, TEST0 + a.test_cases):
        from vocoslicer.device import pick_device
        from vocoslicer.infer.classify import build_classifier

        dev = pick_device(a.device)
        model = model or build_classifier(bundle, dev)
        r = classify_image(generate_phantom(s, finding=finding(s), **grid(a)).image, bundle, model, dev)
        want = "splenomegaly" if s % 2 else "normal"
        correct += r["predicted"]["name"] == want
        probs.append(r["probabilities"][bundle.classes.index("splenomegaly")])
        truth.append(s % 2)
    auc = float(compute_roc_auc(torch.tensor(probs), torch.tensor(truth)))
    return correct / a.test_cases, auc


def main() -> int:
    """Run every (k, init) finetune, print the table, optionally append it to a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--steps", type=int, default=300, help="finetune steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--unlabelled", type=int, default=32, help="phantoms for VoCo pretraining")
    ap.add_argument("--voco-init", default=None, help="VoCo checkpoint / backbone bundle instead of pretraining here")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=4.0, help="phantom and model spacing in mm")
    ap.add_argument("--input-size", default="96,96,64")
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--val-cases", type=int, default=4)
    ap.add_argument("--test-cases", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cpu-reduced", action="store_true",
                    help="the size this 2-core CPU can run: fs 12, 64x32x32 input, 8 mm, few steps")
    ap.add_argument("--work", default="runs/bench_classify")
    ap.add_argument("--results-md", default=None)
    a = ap.parse_args()
    if a.cpu_reduced:
        a.device, a.feature_size, a.input_size, a.spacing = "cpu", 12, "64,32,32", 8.0
        a.steps, a.pretrain_steps, a.unlabelled, a.batch = min(a.steps, 8), min(a.pretrain_steps, 6), 4, 2
        a.test_cases, a.val_cases = min(a.test_cases, 8), 2
    a.input_size = [int(v) for v in a.input_size.split(",")]
    if a.device == "auto":
        from vocoslicer.device import pick_device

        a.device = str(pick_device(a.device))
    ks = [int(v) for v in a.ks.split(",") if v]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    voco = a.voco_init or str(pretrain(work, a))
    rows = []
    for k in ks:
        cohort = cohort_for(work, k, a)
        row = {"k": k}
        for name, init in (("scratch", "scratch"), ("voco", voco)):
            out = work / f"run_k{k}_{name}"
            summary_path = out / "summary.json"
            if not summary_path.is_file():
                opts = ClsOptions(cohort=cohort.root, init=init, out=out, arch="voco_classifier", steps=a.steps,
                                  lr=a.lr, batch=a.batch, input_size=a.input_size, feature_size=a.feature_size,
                                  preprocessing={"spacing": [a.spacing] * 3}, device=a.device,
                                  amp="off" if a.device == "cpu" else "bf16", eval_every=max(1, a.steps // 4),
                                  install=False, model_id=f"bench-{name}-k{k}")
                run_classification_finetune(opts)
            acc, auc = test_metrics(out / "best_bundle", a)
            row[name] = (acc, auc)
            print(json.dumps({"k": k, "init": name, "test_acc": acc, "test_auc": auc}), flush=True)
        rows.append(row)
    minutes = (time.time() - t0) / 60
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU {platform.machine()}"
    lines = [f"### {dt.date.today().isoformat()} — {dev}, torch {torch.__version__}", "",
             f"`python benchmarks/bench_classify.py {' '.join(sys.argv[1:])}` ({minutes:.1f} min; "
             f"fs {a.feature_size}, input {a.input_size}, {a.spacing} mm, {a.steps} steps, batch {a.batch}, "
             f"{a.val_cases} val / {a.test_cases} test phantoms, VoCo init: "
             f"{a.voco_init or f'pretrain voco {a.pretrain_steps} steps on {a.unlabelled} phantoms'})", "",
             "| k labelled | scratch acc | scratch AUC | VoCo acc | VoCo AUC | VoCo/scratch acc |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        (sa, su), (va, vu) = r["scratch"], r["voco"]
        lines.append(f"| {r['k']} | {sa:.3f} | {su:.3f} | {va:.3f} | {vu:.3f} | "
                     f"{(va / sa if sa else float('nan')):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.results_md:
        with open(a.results_md, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
