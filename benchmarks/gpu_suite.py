"""Every GPU speed goal of the project in one call, each against its baseline in the same run, within a budget.

    python benchmarks/gpu_suite.py --device cuda --budget-s 540      # one H100/H200, ~9 minutes with warm-up
    python benchmarks/gpu_suite.py --device cpu --smoke              # every part at toy size, < 3 minutes

GPU time is scarce, so the suite is built to degrade: every part has its own time slice (a share of the budget,
enforced by a timeout), a part whose minimum no longer fits in what is left is skipped with a line saying so, and
results are written as they come — the dated section in benchmarks/RESULTS.md grows part by part and the JSON is
rewritten (atomically) after each part, so a run cut off by the budget or by a lost machine still leaves every
number measured so far. Parts reuse the project's benchmarks as child processes (bench_infer.py,
bench_pretrain.py, bench_pumit.py, bench_label_efficiency.py); only the model-throughput variants (plain MONAI
fp32 vs bf16 + SDPA, ``torch.compile``, CUDA graphs, TensorRT when ``torch_tensorrt`` imports) live here.

Goals (issue 17): VoCo-B 96³ patches/s ≥ 4× plain MONAI; official inference (1.5 mm, overlap 0.75, 288×288×320)
≤ 3 s, overlap 0.5 ≤ 0.5 s; end to end 512×512×~300 CT → file ≤ 3 s, warm worker second case ≤ 1 s; VoCo-B
pretraining ≥ 1.5× the official loop at ≤ equal memory; PUMIT bf16 vs fp32; a reduced label-efficiency table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Part:
    """One measurement: a child command, its share of the budget and the least time it needs to say anything."""

    name: str
    goal: str
    share: float
    min_s: float
    cmd: list[str] = field(default_factory=list)
    sized: bool = False  # the command is built from the seconds left (label efficiency)


def throughput_child(device: str, smoke: bool, seconds: float) -> dict[str, Any]:
    """VoCo-B windows/s: plain MONAI fp32 vs ours (bf16/fp16 autocast + SDPA), + torch.compile / CUDA graphs / TRT."""
    import torch

    from vocoslicer.infer.sliding import autocast_context, enable_fast_attention
    from vocoslicer.models.swin import build_swinunetr

    dev = torch.device(device)
    fs, edge, batch = (12, 64, 1) if smoke else (48, 96, 4)  # 64³: the smallest SwinUNETR input with a 2³ bottleneck
    torch.manual_seed(0)
    plain = build_swinunetr(None, feature_size=fs, out_channels=14).to(dev).eval()
    x = torch.rand((batch, 1, edge, edge, edge), device=dev)
    deadline = time.monotonic() + seconds

    def rate(fn: Any, n: int) -> float:
        with torch.inference_mode():
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return n * batch / (time.perf_counter() - t0)

    n = 1 if smoke else 10
    rows: dict[str, Any] = {"window": edge, "batch": batch, "feature_size": fs, "plain_monai_fp32": rate(
        lambda: plain(x), n)}
    fast = build_swinunetr(None, feature_size=fs, out_channels=14).to(dev).eval()
    fast.load_state_dict(plain.state_dict())
    enable_fast_attention(fast)
    amp = "auto" if dev.type == "cuda" else "off"

    def ours() -> Any:
        with autocast_context(dev, amp):
            return fast(x)

    rows["ours_amp_sdpa"] = rate(ours, n)
    variants = [("ours_compile", {}), ("ours_compile_cudagraphs", {"mode": "reduce-overhead"})]
    for name, kw in variants:
        if dev.type != "cuda":  # inductor on a CPU compiles for minutes (issue 17): not a toy-size check
            rows[name] = "skipped: GPU only"
            continue
        if time.monotonic() > deadline - 60:
            rows[name] = "skipped: out of time"
            continue
        try:
            cm = torch.compile(fast, **kw)
            rows[name] = rate(_amp_call(cm, x, dev, amp), n)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            rows[name] = f"failed: {type(exc).__name__}"
    try:
        import torch_tensorrt  # noqa: F401

        rows["tensorrt"] = "available (not timed: needs a per-shape engine build longer than its slice)"
    except Exception:  # noqa: BLE001
        rows["tensorrt"] = "skipped: torch_tensorrt does not import here"
    rows["ratio_best_vs_plain"] = max(v for v in rows.values() if isinstance(v, float)) / rows["plain_monai_fp32"]
    return rows


def _amp_call(cm: Any, x: Any, dev: Any, amp: str) -> Any:
    from vocoslicer.infer.sliding import autocast_context

    def fn() -> Any:
        with autocast_context(dev, amp):
            return cm(x)

    return fn


def parts(args: argparse.Namespace) -> list[Part]:
    """The suite's parts, in order; shares of the budget sum to 1 (warm-up is part of the first slice)."""
    py, d, s = sys.executable, args.device, args.smoke
    me = [py, str(Path(__file__).resolve()), "--device", d, "--child", "throughput"] + (["--smoke"] if s else [])
    infer = [py, str(HERE / "bench_infer.py"), "--device", d]
    infer += (["--size", "tiny", "--roi", "64", "--volume", "72", "64", "64", "--repeats", "1", "--sw-batch", "2",
               "--overlaps", "0.5"]
              if s else ["--size", "B", "--roi", "96", "--volume", "288", "288", "320", "--repeats", "2"])
    e2e = [py, str(HERE / "bench_infer.py"), "--device", d, "--skip-throughput", "--e2e", "--engines", "cli"]
    e2e += ["--e2e-size", "tiny", "--e2e-volume", "64", "64", "40", "--workdir", str(args.work / "infer")] if s else []
    pre = [py, str(HERE / "bench_pretrain.py"), "--device", d]
    pre += (["--tiny", "--skip-steps", "--loss-iters", "2", "--workers", "0", "--loader-batches", "2", "--phantoms",
             "2"] if s else ["--warmup", "3", "--steps", "10", "--repeats", "2", "--loader-batches", "20"])
    pumit = [py, str(HERE / "bench_pumit.py"), "--device", d]
    pumit += ["--size", "bench", "--warmup", "1", "--steps", "1", "--repeats", "1"] if s else ["--steps", "5",
                                                                                               "--repeats", "2"]
    return [
        Part("model throughput", "VoCo-B 96³ patches/s ≥ 4× plain MONAI fp32", 0.12, 10 if s else 60, me),
        Part("official inference", "overlap 0.75 ≤ 3 s, overlap 0.5 ≤ 0.5 s (288×288×320, VoCo-B)", 0.14,
             10 if s else 60, infer),
        Part("end to end", "512×512×~300 CT → file ≤ 3 s; warm worker second case ≤ 1 s", 0.16, 15 if s else 60,
             e2e),
        Part("VoCo pretraining", "≥ 1.5× the official loop steps/s at ≤ equal peak memory", 0.2, 10 if s else 90,
             pre),
        Part("PUMIT", "tokenizer / MIM steps/s, bf16 vs fp32", 0.13, 10 if s else 60, pumit),
        Part("label efficiency", "first k-labelled table (reduced)", 0.25, 20 if s else 90, [], sized=True),
    ]


def label_efficiency_cmd(args: argparse.Namespace, seconds: float) -> list[str]:
    """bench_label_efficiency sized to ``seconds``: more steps and ks when more time is left."""
    cmd = [sys.executable, str(HERE / "bench_label_efficiency.py"), "--device", args.device, "--work",
           str(args.work / "label_efficiency"), "--seeds", "1", "--methods", "scratch,voco"]
    if args.smoke:
        return cmd + ["--ks", "1", "--unlabelled", "2", "--steps", "1", "--pretrain-steps", "1", "--spacing", "8",
                      "--roi", "64,64,32", "--batch", "1", "--test-cases", "1", "--methods", "scratch"]
    steps = int(max(20, min(300, seconds / 3)))  # ~0.15 s a step on an H100 (VoCo-fs12, 64³); x3 runs + pretrain
    return cmd + ["--ks", "1,4", "--unlabelled", "8", "--steps", str(steps), "--pretrain-steps", str(steps),
                  "--spacing", "4"]


def atomic_write(path: Path, text: str) -> None:
    from vocoslicer.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def run_part(part: Part, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(part.cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"cut off at its {timeout:.0f} s slice"
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    lines = [ln for ln in out.splitlines() if ln.strip() and "Warning" not in ln]
    rec: dict[str, Any] = {"part": part.name, "goal": part.goal, "status": status,
                           "seconds": round(time.perf_counter() - t0, 1), "output": lines[-40:]}
    for ln in lines:
        if ln.startswith("RESULT "):
            rec["result"] = json.loads(ln[7:])
    if status != "ok":
        rec["stderr_tail"] = [ln for ln in err.splitlines() if ln.strip()][-5:]
    return rec


def markdown(rec: dict[str, Any]) -> str:
    head = f"**{rec['part']}** — goal: {rec['goal']} — {rec['status']}"
    if rec["status"].startswith("skipped"):
        return head + "\n"
    body = [head + f" ({rec['seconds']} s)", ""]
    if "result" in rec:
        body += ["| measure | value |", "|---|---|"] + [
            f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rec["result"].items()]
    else:
        table = [ln for ln in rec["output"] if ln.startswith("|")]
        body += table or ["```", *rec["output"][-12:], "```"]
    if rec.get("stderr_tail"):
        body += ["", "stderr: `" + " / ".join(rec["stderr_tail"])[-300:] + "`"]
    return "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the suite) or cpu (with --smoke)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total seconds, warm-up included")
    p.add_argument("--smoke", action="store_true", help="toy sizes (CPU check that every part still runs)")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/gpu_suite_<UTC time>.json")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vocoslicer_gpu_suite")
    p.add_argument("--only", default=None, help="comma-separated part names (default: all)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "throughput":
        print("RESULT " + json.dumps(throughput_child(args.device, args.smoke, args.budget_s)), flush=True)
        return 0
    start = time.monotonic()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: --device cuda but no CUDA GPU here (use --device cpu --smoke for the CPU check)",
              file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    args.json = args.json or HERE / f"gpu_suite_{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU {platform.machine()}"
    env = {**os.environ, "VOCOSLICER_HOME": str(args.work / "home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "VoCoSlicer"), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    report: dict[str, Any] = {"date": now.isoformat(timespec="seconds"), "device": gpu, "smoke": args.smoke,
                              "budget_s": args.budget_s, "torch": torch.__version__, "parts": []}
    md = args.results_md
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    text = text.rstrip("\n") + (f"\n\n## GPU suite (issue 17) — {now.strftime('%Y-%m-%d %H:%M UTC')}, {gpu}"
                                f"{' (smoke: toy sizes, numbers meaningless)' if args.smoke else ''}\n\n"
                                f"`python benchmarks/gpu_suite.py {' '.join(argv or sys.argv[1:])}`\n\n")
    atomic_write(md, text)
    wanted = None if not args.only else {w.strip() for w in args.only.split(",")}
    for part in parts(args):
        if wanted is not None and part.name not in wanted:
            continue
        left = args.budget_s - (time.monotonic() - start)
        slice_s = min(part.share * args.budget_s, left)
        if slice_s < part.min_s:
            rec = {"part": part.name, "goal": part.goal, "seconds": 0,
                   "status": f"skipped: {left:.0f} s left, needs at least {part.min_s:.0f} s"}
        else:
            if part.sized:
                part.cmd = label_efficiency_cmd(args, slice_s)
            if part.name == "model throughput":
                part.cmd += ["--budget-s", str(slice_s)]
            rec = run_part(part, slice_s, env)
        report["parts"].append(rec)
        print(markdown(rec), flush=True)
        text += markdown(rec) + "\n"
        atomic_write(md, text)  # results as they come: a cut-off run keeps them
        atomic_write(args.json, json.dumps(report, indent=1))
    report["total_s"] = round(time.monotonic() - start, 1)
    atomic_write(args.json, json.dumps(report, indent=1))
    print(f"wrote {md} and {args.json} in {report['total_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
