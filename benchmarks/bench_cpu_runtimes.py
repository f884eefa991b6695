"""CPU runtimes for the segmentation networks: eager PyTorch vs OpenVINO / ONNX Runtime (/ torch.compile), same run.

Run as ``python benchmarks/bench_infer.py --cpu-runtimes`` (or this file directly). Two tables, one process per
measurement (peak RSS is per process):

- model: one VoCo-B window (random weights) per candidate: export seconds (once), seconds per window, ratio vs
  eager, peak RSS, agreement (argmax voxels equal to eager's, max |logit - eager|);
- end to end: ``vocoslicer segment --device cpu --runtime R`` on CT-sized phantoms: VoCo-B ``--fast`` on a
  512×512×300 CT (eager vs OpenVINO first run, which pays the export, and cached run), VoCo-B full resolution on a
  smaller CT, and the trained demo model (agreement = per-structure Dice of the label map vs eager's, plus the mean
  Dice vs the phantom's truth). Weights of VoCo-B are random: speed does not depend on them.

``--append`` adds the tables to benchmarks/RESULTS.md under "CPU runtimes (issue 17)" with the date, the CPU, the
command and the machine load (``uptime``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("eager", "openvino", "openvino-f32", "onnxruntime", "torch.compile")

# one candidate, one process: build VoCo-B (seed 0), export (timed), warm up, time `repeats` windows, save logits
_MODEL_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from vocoslicer.infer.sliding import enable_fast_attention
from vocoslicer.models.swin import build_swinunetr
name, out, work = sys.argv[1], sys.argv[5], sys.argv[6]
fs, edge, repeats = (int(v) for v in sys.argv[2:5])
torch.manual_seed(0)
model = build_swinunetr(None, feature_size=fs, out_channels=14).eval()
enable_fast_attention(model)
x = torch.rand((1, 1, edge, edge, edge), generator=torch.Generator().manual_seed(1))
t0 = time.perf_counter()
if name == "eager":
    def run(a):
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()
elif name.startswith("openvino"):
    import openvino as ov
    with torch.no_grad():
        om = ov.convert_model(model, example_input=x)
    cfg = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if name == "openvino-f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    req = ov.Core().compile_model(om, "CPU", cfg).create_infer_request()
    run = lambda a: np.array(req.infer({0: a})[0])
elif name == "onnxruntime":
    import onnxruntime as ort
    path = work + "/model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=True, optimize=True, verbose=False)
    so = ort.SessionOptions(); so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    run = lambda a: sess.run(None, {iname: a})[0]
elif name == "torch.compile":
    cm = torch.compile(model)
    def run(a):
        with torch.inference_mode():
            return cm(torch.from_numpy(a)).numpy()
a = x.numpy()
y = run(a)  # warm-up (and, for torch.compile, the compilation)
export_s = time.perf_counter() - t0
best = float("inf")
for _ in range(repeats):
    t1 = time.perf_counter(); y = run(a); best = min(best, time.perf_counter() - t1)
np.save(out, y.astype(np.float32))
print("RESULT " + json.dumps({"export_s": export_s, "seconds": best,
                               "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

_SEG_CHILD = ("import resource, sys\nfrom vocoslicer.cli import main\nrc = main(sys.argv[1:])\n"
              "sys.stderr.write('MAXRSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
              "sys.exit(rc)\n")


def available(name: str) -> str | None:
    """Why a candidate cannot run here (``None``: it can)."""
    import importlib.util
    import shutil

    mod = {"openvino": "openvino", "openvino-f32": "openvino", "onnxruntime": "onnxruntime"}.get(name)
    if mod and importlib.util.find_spec(mod) is None:
        return f"{mod} not installed"
    if name == "onnxruntime" and importlib.util.find_spec("onnxscript") is None:
        return "onnxscript (torch.onnx exporter) not installed"
    if name == "torch.compile" and shutil.which("cc") is None:
        return "no C compiler for inductor"
    return None


def model_table(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ref = None
    for name in args.candidates:
        why = available(name)
        if why:
            rows.append({"runtime": name, "skipped": why})
            print(f"model {name}: skipped ({why})", flush=True)
            continue
        out = work / f"logits_{name}.npy"
        proc = subprocess.run([sys.executable, "-c", _MODEL_CHILD, name, str(args.feature_size), str(args.window),
                               str(args.repeats), str(out), str(work)], capture_output=True, text=True,
                              timeout=args.child_timeout)
        res = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not res:
            rows.append({"runtime": name, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1][:120]}"})
            print(f"model {name}: failed", flush=True)
            continue
        row = {"runtime": name, **json.loads(res[0][7:])}
        y = np.load(out)
        if ref is None and name == "eager":
            ref = y
        if ref is not None:
            row["agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
            row["max_abs_diff"] = float(np.abs(y - ref).max())
        rows.append(row)
        print(f"model {name}: {row}", flush=True)
    base = next((r["seconds"] for r in rows if r["runtime"] == "eager" and "seconds" in r), None)
    for r in rows:
        if base and "seconds" in r:
            r["ratio"] = base / r["seconds"]
    return rows


def make_case(work: Path, size: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    from vocoslicer.data.phantom import generate_phantom
    from vocoslicer.io import write_image

    img, lab = work / f"ct_{'x'.join(map(str, size))}.nii", work / f"truth_{'x'.join(map(str, size))}.nii.gz"
    if not img.is_file():
        ph = generate_phantom(seed, spacing=(0.7, 0.7, 1.0), size=size)
        write_image(ph.label, lab)
        write_image(ph.image, img, compress=False)
    return img, lab


def make_voco_b(work: Path, fs: int) -> Path:
    from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
    from vocoslicer.models.catalog import label_table
    from vocoslicer.models.swin import build_swinunetr

    out = work / f"bench-voco-fs{fs}"
    if not (out / "model.json").is_file():
        import torch

        torch.manual_seed(0)
        arch = {"size": None, "feature_size": fs, "out_channels": 14}
        meta = new_bundle_meta(out.name, "1.0.0", "segmentation", "swinunetr", arch)
        ModelBundle(meta=meta, labels=label_table("btcv")).save(out, build_swinunetr(**arch).state_dict())
    return out


def segment(case: Path, model: str, runtime: str, fast: bool, out: Path, threads: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _SEG_CHILD, "segment", str(case), "-o", str(out), "--device", "cpu",
           "--runtime", runtime] + (["--model", model] if model else []) + (["--fast"] if fast else [])
    cmd += ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"segment failed: {proc.stderr.strip()[-400:]}")
    rss = [int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")]
    return {"seconds": seconds, "rss_gib": rss[0] / 2**20 if rss else None}


def dice_table(pred: Path, ref: Path) -> dict[int, float]:
    import SimpleITK as sitk

    from vocoslicer.metrics import dice_per_label

    p, r = (sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (pred, ref))
    values = [int(v) for v in np.unique(np.concatenate([np.unique(p), np.unique(r)])) if v]
    return {k: v for k, v in dice_per_label(p, r, values).items() if not np.isnan(v)}


def e2e_table(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    os.environ["VOCOSLICER_HOME"] = str(work / "home")  # a fresh graph cache: the first run pays the export
    voco = str(make_voco_b(work, args.feature_size))
    big, _ = make_case(work, tuple(args.ct))
    small, _ = make_case(work, tuple(args.full_ct))
    demo_case, demo_truth = make_case(work, tuple(args.demo_ct), seed=1001)
    plan = [("VoCo-B --fast", voco, big, True), ("VoCo-B full resolution", voco, small, False),
            ("demo model (full resolution = 3 mm)", "", demo_case, False)]
    rows = []
    for what, model, case, fast in plan:
        ref_out = work / f"{len(rows)}_eager.nii.gz"
        runs = [("eager", ref_out)] + [(f"{args.runtime} run {i}", work / f"{len(rows)}_{i}.nii.gz") for i in (1, 2)]
        base = None
        for label, out in runs:
            rt_name = "eager" if label == "eager" else args.runtime
            graphs = len(list((work / "home" / "cache" / "runtime").glob("*/*")))
            r = segment(case, model, rt_name, fast, out, args.threads)
            if len(list((work / "home" / "cache" / "runtime").glob("*/*"))) > graphs:
                label += " (exported the graph)"
            base = base or r["seconds"]
            row = {"case": f"{what}, {case.stem}", "runtime": label, **r, "ratio": base / r["seconds"]}
            if label != "eager":
                d = dice_table(out, ref_out)
                row["min_dice_vs_eager"] = min(d.values()) if d else float("nan")
            if not model:
                truth = dice_table(out, demo_truth)
                row["mean_dice_vs_truth"] = float(np.mean(list(truth.values())))
            rows.append(row)
            print(f"e2e {row}", flush=True)
    return rows


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def tables(model_rows: list[dict[str, Any]], e2e_rows: list[dict[str, Any]], window: int) -> str:
    lines = [f"| runtime (one VoCo-B {window}³ window) | export s | seconds | ratio vs eager | peak RSS GiB | "
             "agreement (argmax) | max abs logit diff |", "|---|---|---|---|---|---|---|"]
    for r in model_rows:
        if "skipped" in r:
            lines.append(f"| {r['runtime']} | skipped: {r['skipped']} | | | | | |")
        else:
            lines.append(f"| {r['runtime']} | {fmt(r['export_s'], '.1f')} | {fmt(r['seconds'])} | "
                         f"{fmt(r.get('ratio'))}x | {fmt(r['rss_gib'])} | {fmt(r.get('agreement'), '.4f')} | "
                         f"{fmt(r.get('max_abs_diff'), '.3g')} |")
    if e2e_rows:
        lines += ["", "| end to end (`segment --device cpu`) | runtime | seconds | ratio vs eager | peak RSS GiB | "
                  "min Dice vs eager | mean Dice vs truth |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['runtime']} | {r['seconds']:.1f} | {r['ratio']:.2f}x | {fmt(r['rss_gib'])} | "
                  f"{fmt(r.get('min_dice_vs_eager'), '.4f')} | {fmt(r.get('mean_dice_vs_truth'), '.4f')} |"
                  for r in e2e_rows]
    return "\n".join(lines)


def append(text: str, header: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    if "## CPU runtimes (issue 17)" not in body:
        body = body.rstrip("\n") + "\n\n## CPU runtimes (issue 17)\n"
    head, sep, tail = body.partition("## CPU runtimes (issue 17)\n")
    nxt = tail.find("\n## ")
    section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
    path.write_text(head + sep + section.rstrip("\n") + "\n\n" + header + "\n\n" + text + "\n" + rest)
    print(f"appended to {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES[:4]),
                   help="model-table runtimes (torch.compile is opt-in: its compile takes minutes here)")
    p.add_argument("--feature-size", type=int, default=48, help="SwinUNETR feature size (48 = VoCo-B)")
    p.add_argument("--window", type=int, default=64, help="window edge of the model table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child-timeout", type=int, default=1200)
    p.add_argument("--runtime", default="openvino", help="runtime of the end-to-end runs")
    p.add_argument("--threads", type=int, default=None, help="segment --threads (default: all cores)")
    p.add_argument("--no-e2e", action="store_true", help="model table only")
    p.add_argument("--ct", type=int, nargs=3, default=[512, 512, 300], help="the --fast CT (voxels, 0.7x0.7x1 mm)")
    p.add_argument("--full-ct", type=int, nargs=3, default=[256, 256, 150], help="the full-resolution CT")
    p.add_argument("--demo-ct", type=int, nargs=3, default=[512, 512, 300], help="the demo-model CT")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vocoslicer_bench_cpu")
    p.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    model_rows = model_table(args, args.workdir)
    e2e_rows = [] if args.no_e2e else e2e_table(args, args.workdir)
    load1 = os.getloadavg()
    text = tables(model_rows, e2e_rows, args.window)
    print(text)
    import torch

    header = (f"### {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} — CPU {platform.machine()}, "
              f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n\n"
              f"`python benchmarks/bench_infer.py --cpu-runtimes {' '.join(argv or sys.argv[1:])}`; load average "
              f"(1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end (machine shared with other jobs)")
    if args.append:
        append(text, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
