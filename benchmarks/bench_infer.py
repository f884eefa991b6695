"""Segmentation inference speed: plain MONAI sliding window (the official VoCo setting) vs ours, same run.

Model time (one process, same model, same volume, same device):

- baseline: ``monai.inferers.sliding_window_inference`` in fp32, ``mode="constant"``, ``sw_batch_size=4`` (the
  official VoCo test-time setting), at overlap 0.75 (official) and 0.5, followed by the argmax;
- ours: :func:`vocoslicer.infer.sliding.sliding_window_labels` at the same overlap (gaussian blending, batched
  windows, bf16/fp16 autocast on CUDA, SDPA window attention, streaming argmax on the device, uint8 labels).

Reported: windows ("patches") per second, seconds, ratio baseline/ours, label agreement, peak GPU memory.
End to end (``--e2e``): a 512×512×300 CT phantom through ``python -m vocoslicer segment`` (read → segmentation
file, in a child process: seconds and peak RSS), ``--fast`` on the CPU, and the second case through the warm
worker (``serve --stdio``). Weights are random (timing does not depend on them; no network here).

CPU defaults are small (tiny model, 64³ windows, 96×96×64 volume) because a 2-core CPU needs ~7 s per VoCo-B
96³ window; on CUDA the defaults are the issue's goals: VoCo-B, 96³, the 288×288×320 abdomen at 1.5 mm.
``--append`` adds the table to benchmarks/RESULTS.md under "Inference (issue 3)". ``--cpu-runtimes`` runs
benchmarks/bench_cpu_runtimes.py instead (eager vs OpenVINO / ONNX Runtime on the CPU, issue 17).
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

import torch

from vocoslicer.infer.sliding import count_windows, enable_fast_attention, sliding_window_labels
from vocoslicer.models.swin import build_swinunetr

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def monai_baseline(model: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], overlap: float,
                   device: torch.device) -> torch.Tensor:
    """The official inference: fp32 MONAI sliding window with constant blending, then argmax."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        scores = sliding_window_inference(x.to(device), roi, 4, model, overlap=overlap, mode="constant")
        return scores.argmax(1)[0].to(torch.uint8).cpu()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, Any]:  # noqa: ANN001
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Model-time comparison at every requested overlap."""
    torch.manual_seed(0)
    fs = {"tiny": 12, "B": 48, "L": 96, "H": 192}[args.size]
    plain = build_swinunetr(None, feature_size=fs, out_channels=14).to(device).eval()
    fast = build_swinunetr(None, feature_size=fs, out_channels=14).to(device).eval()
    fast.load_state_dict(plain.state_dict())
    enable_fast_attention(fast)
    roi = (args.roi,) * 3
    x = torch.rand((1, 1, *args.volume), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # warm-up: cuDNN autotuning, allocator, lazy init (one window each)
        plain(torch.zeros((1, 1, *roi), device=device))
        sliding_window_labels(fast, torch.zeros((1, 1, *roi)), roi, device=device, sw_batch_size=1)
    rows = []
    for ov in args.overlaps:
        n = count_windows(args.volume, roi, ov)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_base, lab_base = timed(lambda ov=ov: monai_baseline(plain, x, roi, ov, device), device, args.repeats)
        mem_base = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_ours, lab_ours = timed(lambda ov=ov: sliding_window_labels(fast, x, roi, overlap=ov, mode="gaussian",
                                                                     sw_batch_size=args.sw_batch, device=device),
                                 device, args.repeats)
        mem_ours = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        agree = float((lab_base == lab_ours).float().mean())
        row = {"overlap": ov, "windows": n, "monai_s": t_base, "ours_s": t_ours, "monai_patches_s": n / t_base,
               "ours_patches_s": n / t_ours, "ratio": t_base / t_ours, "label_agreement": agree,
               "monai_peak_gib": mem_base, "ours_peak_gib": mem_ours}
        rows.append(row)
        print(f"overlap {ov}: {n} windows of {args.roi}^3 | MONAI fp32 constant {t_base:.2f} s "
              f"({row['monai_patches_s']:.2f} patches/s) | ours {t_ours:.2f} s ({row['ours_patches_s']:.2f} "
              f"patches/s) | ratio {row['ratio']:.2f}x | label agreement {agree:.4f}"
              + (f" | peak GPU {mem_base:.1f} vs {mem_ours:.1f} GiB" if mem_base is not None else ""), flush=True)
    return rows


def make_bundle(workdir: Path, size: str) -> Path:
    """A random-weight VoCo bundle with the BTCV labels (timing only)."""
    from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
    from vocoslicer.models.catalog import label_table

    out = workdir / f"bench-voco-{size.lower()}"
    if (out / "model.json").is_file():
        return out
    args = {"size": size, "out_channels": 14} if size != "tiny" else {"size": None, "feature_size": 12,
                                                                      "out_channels": 14}
    meta = new_bundle_meta(f"bench-voco-{size.lower()}", "1.0.0", "segmentation", "swinunetr", args)
    torch.manual_seed(0)
    sd = build_swinunetr(**args).state_dict()
    return ModelBundle(meta=meta, labels=label_table("btcv")).save(out, sd)


def make_phantom(workdir: Path, size: tuple[int, int, int]) -> Path:
    """The CT-sized phantom (0.7 × 0.7 × 1.0 mm), written once as uncompressed NIfTI."""
    from vocoslicer.data.phantom import generate_phantom
    from vocoslicer.io import write_image

    path = workdir / f"phantom_{'x'.join(map(str, size))}.nii"
    if not path.is_file():
        print(f"generating a {size} phantom (once) ...", flush=True)
        write_image(generate_phantom(0, spacing=(0.7, 0.7, 1.0), size=size).image, path, compress=False)
    return path


_CHILD = ("import resource, sys\nfrom vocoslicer.cli import main\nrc = main(sys.argv[1:])\n"
          "sys.stderr.write('MAXRSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
          "sys.exit(rc)\n")


# read → prepare → our engine (segment_prepared) → write, as one child process: the pipeline of `segment` with the
# fast engine, measured independently of how infer/segment.py wires it
_CHILD_OURS = """import resource, sys, time
import torch
from vocoslicer.infer.preprocess import prepare
from vocoslicer.device import pick_device
from vocoslicer.infer.segment import FAST_SPACING
from vocoslicer.infer.sliding import segment_prepared
from vocoslicer.io import read_image, write_image
from vocoslicer.models.bundle import ModelBundle
src, out, bundle_dir, device, fast = sys.argv[1:6]
dev = pick_device(device)
bundle = ModelBundle.load(bundle_dir)
img = read_image(src)
model = bundle.build_model().to(dev)
pre = prepare(img, bundle.preprocessing, FAST_SPACING if fast == "1" else None)
inf = bundle.inference
label = segment_prepared(model, pre.tensor, pre.grid, img, bundle.channel_values, inf["roi_size"], inf["overlap"],
                         inf["mode"], inf["sw_batch_size"], dev, whole_volume=fast == "1")
write_image(label, out)
bundle.labels.write_csv(out + ".labels.csv")
sys.stderr.write('MAXRSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def e2e_segment(phantom: Path, bundle: Path, out: Path, device: str, fast: bool, engine: str = "cli"
                ) -> dict[str, Any]:
    """``vocoslicer segment`` (engine "cli") or read→ours→write (engine "ours") in a child: seconds, peak RSS."""
    if engine == "cli":
        cmd = [sys.executable, "-c", _CHILD, "segment", str(phantom), "-o", str(out), "--model", str(bundle),
               "--device", device] + (["--fast"] if fast else [])
    else:
        cmd = [sys.executable, "-c", _CHILD_OURS, str(phantom), str(out), str(bundle), device, "1" if fast else "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    what = "`segment` CLI" if engine == "cli" else "read → our engine → write"
    return {"what": f"{what} {'--fast ' if fast else ''}{device}", "seconds": seconds,
            "peak_rss_gib": rss[0] / 2**20 if rss else None}


def e2e_worker(phantom: Path, bundle: Path, workdir: Path, device: str, fast: bool) -> dict[str, Any]:
    """Two cases through ``serve --stdio``: the second one is what a Slicer user waits for."""
    proc = subprocess.Popen([sys.executable, "-m", "vocoslicer", "serve", "--stdio", "--device", device],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    times = []
    assert proc.stdin is not None and proc.stdout is not None
    for i in range(2):
        req = {"id": i, "op": "segment", "input": str(phantom), "output": str(workdir / f"w{i}.nii.gz"),
               "model": str(bundle), "device": device, "fast": fast}
        t0 = time.perf_counter()
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        while True:
            msg = json.loads(proc.stdout.readline())
            if msg["kind"] in ("result", "error"):
                break
        if msg["kind"] == "error":
            proc.kill()
            raise SystemExit(f"worker error: {msg['message']}")
        times.append(time.perf_counter() - t0)
    proc.stdin.write(json.dumps({"id": "bye", "op": "shutdown"}) + "\n")
    proc.stdin.flush()
    proc.wait(timeout=60)
    return {"what": f"worker {'--fast ' if fast else ''}{device}: first / second case", "seconds": times[1],
            "first_seconds": times[0]}


def append_results(args: argparse.Namespace, device_text: str, rows: list[dict], e2e: list[dict]) -> None:
    lines = [f"\n### {dt.date.today().isoformat()} — {device_text}\n",
             f"`{' '.join(['python', 'benchmarks/bench_infer.py', *sys.argv[1:]])}`  ",
             (f"model VoCo-{args.size} (random weights), windows {args.roi}^3, volume {tuple(args.volume)}, ours "
              f"sw_batch {args.sw_batch}; baseline = MONAI sliding_window_inference fp32 constant sw_batch 4\n"
              if rows else f"end-to-end model VoCo-{args.e2e_size or 'B'} (random weights, BTCV labels), "
                           f"{'x'.join(map(str, args.e2e_volume))} phantom\n")]
    if rows:
        lines += ["| overlap | windows | MONAI s | MONAI patches/s | ours s | ours patches/s | ratio | agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['overlap']} | {r['windows']} | {r['monai_s']:.2f} | {r['monai_patches_s']:.2f} | "
                  f"{r['ours_s']:.2f} | {r['ours_patches_s']:.2f} | {r['ratio']:.2f}x | {r['label_agreement']:.4f} |"
                  for r in rows]
    if e2e:
        lines += ["", "| end to end | seconds | peak RSS GiB |", "|---|---|---|"]
        for r in e2e:
            extra = f" (first case {r['first_seconds']:.1f} s)" if "first_seconds" in r else ""
            rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") else "-"
            lines.append(f"| {r['what']}{extra} | {r['seconds']:.1f} | {rss} |")
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "## Inference (issue 3)" not in text:
        text += "\n## Inference (issue 3)\n"
    head, sep, tail = text.partition("## Inference (issue 3)\n")
    nxt = tail.find("\n## ")
    section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
    path.write_text(head + sep + section.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + rest)
    print(f"appended to {path}")


def main() -> int:
    if "--cpu-runtimes" in sys.argv[1:]:  # eager vs OpenVINO / ONNX Runtime on the CPU: its own script
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_cpu_runtimes import main as cpu_runtimes

        return cpu_runtimes([a for a in sys.argv[1:] if a != "--cpu-runtimes"])
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--size", choices=("tiny", "B", "L", "H"), default=None,
                   help="model (default B on CUDA, tiny on CPU)")
    p.add_argument("--roi", type=int, default=None, help="window edge (default 96 on CUDA, 64 on CPU)")
    p.add_argument("--volume", type=int, nargs=3, default=None, help="X Y Z (default 288 288 320 CUDA, 96 96 64 CPU)")
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--sw-batch", type=int, default=None, help="our windows per batch (default 8 CUDA, 2 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept (default 3 CUDA, 1 CPU)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--e2e", action="store_true", help="end-to-end 512x512x300 phantom runs (segment CLI, worker)")
    p.add_argument("--e2e-size", default=None, help="model of the end-to-end runs (default B)")
    p.add_argument("--e2e-volume", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--engines", nargs="+", choices=("cli", "ours"), default=["cli", "ours"],
                   help="end-to-end pipelines: the segment CLI as wired today, and read -> our engine -> write")
    p.add_argument("--skip-worker", action="store_true", help="no warm-worker end-to-end run")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vocoslicer_bench")
    p.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = p.parse_args()
    device = torch.device("cuda" if (args.device == "auto" and cuda) else ("cpu" if args.device == "auto"
                                                                          else args.device))
    on_gpu = device.type == "cuda"
    args.size = args.size or ("B" if on_gpu else "tiny")
    args.roi = args.roi or (96 if on_gpu else 64)
    args.volume = tuple(args.volume or ((288, 288, 320) if on_gpu else (96, 96, 64)))
    args.sw_batch = args.sw_batch or (8 if on_gpu else 2)
    args.repeats = args.repeats or (3 if on_gpu else 1)
    if cuda:
        gpu = torch.cuda.get_device_name(0)
        print(f"GPU: {gpu}")
    else:
        gpu = None
        print("GPU: not available (CPU numbers only; the GPU goals are pending a run on a CUDA machine)")
    device_text = (f"{gpu}" if on_gpu else f"CPU {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    print(f"device: {device} ({device_text})", flush=True)
    rows = [] if args.skip_throughput else throughput(args, device)
    e2e: list[dict[str, Any]] = []
    if args.e2e:
        args.workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VOCOSLICER_HOME", str(args.workdir / "home"))
        bundle = make_bundle(args.workdir, args.e2e_size or "B")
        phantom = make_phantom(args.workdir, tuple(args.e2e_volume))
        runs = [(device.type, True)] + ([(device.type, False)] if on_gpu else [])
        for (dev, fast), engine in ((r, e) for r in runs for e in args.engines):
            r = e2e_segment(phantom, bundle, args.workdir / "seg.nii.gz", dev, fast, engine)
            e2e.append(r)
            print(f"end to end {r['what']}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib'] or 0:.2f} GiB",
                  flush=True)
        if not args.skip_worker:
            r = e2e_worker(phantom, bundle, args.workdir, device.type, fast=not on_gpu)
            e2e.append(r)
            print(f"end to end {r['what']}: {r['first_seconds']:.1f} s / {r['seconds']:.1f} s", flush=True)
    if args.append:
        append_results(args, device_text, rows, e2e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
