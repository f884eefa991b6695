"""VoCo pretraining speed: official per-sample loop loss vs our vectorised loss, same model, same run.

Official recipe on CUDA (default): VoCo-B, 2 volumes × (2 random + 9 base) crops of 64³, fp16 autocast +
GradScaler, gradient checkpointing, AdamW(amsgrad). Reports steps/s, volumes/s and peak memory for
(a) the loss written as the official code does (Python loops over volumes, crops and base pairs) and
(b) ``vocoslicer.ssl.voco.voco_v2_loss`` (batched cosine matrices), interleaved, best of ``--repeats``;
plus the loss alone at the official shapes, the cache size vs input size, and the data-loader rate
(volumes/s with ``--workers`` processes) against the training step rate (headroom > 1: the GPU is never starved).

On CPU use ``--tiny`` (feature size 12, 32×32×64 crops, 2×2 grid, 1 random crop): the numbers say nothing about
GPU speed, only that the benchmark runs. ``--append`` adds a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vocoslicer.ssl.voco import voco_v2_loss


# ------------------------------------------------------------------ the official loss form (baseline)
def _ce(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    pos = (-y * torch.log(1 - (y - s).abs() + 1e-6)).sum() / (y.sum() + 1e-6)
    neg_m = (y == 0).float()
    return pos + (-neg_m * torch.log(1 - s + 1e-6)).sum() / (neg_m.sum() + 1e-6)


def _assign(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):  # one cosine call per (crop, base) pair, like online_assign
        rows.append(torch.stack([F.relu(F.cosine_similarity(x[i:i + 1], bases[k:k + 1]))[0]
                                 for k in range(bases.shape[0])]))
    return torch.stack(rows)


def _reg(z: torch.Tensor) -> torch.Tensor:
    total, n = 0.0, 0
    for k in range(z.shape[0]):
        for m in range(k + 1, z.shape[0]):
            total = total + F.relu(F.cosine_similarity(z[k:k + 1], z[m:m + 1].detach()))[0] ** 2
            n += 1
    return total / max(1, n)


def loop_loss(s_rand, s_base, t_rand, t_base, labels):
    """VoCo v2 loss with the official per-volume / per-crop / per-pair Python loops."""
    bsz = s_rand.shape[0]
    intra = inter = reg = 0.0
    for i in range(bsz):
        j = (i + 1) % bsz
        intra = intra + _ce(labels[i].float(), _assign(s_rand[i].float(), t_base[i].float()))
        with torch.no_grad():
            tgt = _assign(t_rand[i].float(), t_base[j].float())
        inter = inter + _ce(tgt, _assign(s_rand[i].float(), s_base[j].float()))
        reg = reg + _reg(s_base[i].float())
    parts = {"intra": intra / bsz, "inter": inter / bsz, "reg": reg / bsz}
    return parts["intra"] + parts["inter"] + parts["reg"], parts


# ------------------------------------------------------------------ helpers
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS (KB → GB)


def bench_loss_only(dev: torch.device, bsz: int, sw: int, nb: int, d: int, iters: int,
                    repeats: int = 5) -> dict[str, float]:
    """Forward + backward of the loss alone at the official shapes: best-of-repeats ms and aten ops per call.

    The op count is machine-independent: on a GPU every op is at least one kernel launch, which is what the
    loops cost there (tiny tensors, launch-bound).
    """
    torch.manual_seed(0)
    tensors = [torch.randn(bsz, k, d, device=dev, requires_grad=g) for k, g in ((sw, True), (nb, True),
                                                                                  (sw, False), (nb, False))]
    labels = torch.rand(bsz, sw, nb, device=dev)
    fns = {"loop": loop_loss, "vectorised": voco_v2_loss}
    out: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn(*tensors, labels)[0].backward()
        with torch.profiler.profile() as prof:
            fn(*tensors, labels)[0].backward()
        out[name + "_ops"] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: load changes on a shared machine hit both forms alike
            _sync(dev)
            t = time.perf_counter()
            for _ in range(iters):
                fn(*tensors, labels)[0].backward()
            _sync(dev)
            ms = (time.perf_counter() - t) / iters * 1e3
            out[name] = min(out.get(name, ms), ms)
    return out


def bench_steps(args: argparse.Namespace, dev: torch.device) -> dict[str, dict[str, float]]:
    """Full training steps (backbone + heads + loss + optimizer) with each loss, interleaved."""
    from vocoslicer.models.voco_head import VoCoHead

    g = dict(fs=12, roi=32, depth=64, grid=2, sw=1) if args.tiny else dict(fs=args.feature_size, roi=64, depth=64,
                                                                            grid=3, sw=2)
    torch.manual_seed(0)
    model = VoCoHead(feature_size=g["fs"], use_checkpoint=args.grad_ckpt).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, amsgrad=True,
                            **({"fused": True} if dev.type == "cuda" else {}))
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    nb, shape = g["grid"] ** 2, (g["roi"], g["roi"], g["depth"])
    rand = torch.rand(args.batch * g["sw"], 1, *shape, device=dev)
    base = torch.rand(args.batch * nb, 1, *shape, device=dev)
    labels = torch.full((args.batch, g["sw"], nb), 1.0 / nb, device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = model(rand, base, labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    res: dict[str, dict[str, float]] = {}
    fns = {"loop": loop_loss, "vectorised": voco_v2_loss}
    for fn in fns.values():  # warm-up (cuDNN autotune, allocator) for both forms
        model.loss_fn = fn
        for _ in range(args.warmup):
            step()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            model.loss_fn = fn
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(dev)
            sps = args.steps / (time.perf_counter() - t)
            best = res.get(name)
            if best is None or sps > best["steps_per_s"]:
                res[name] = {"steps_per_s": sps, "volumes_per_s": sps * args.batch, "peak_gb": _peak_gb(dev)}
    res["config"] = {**g, "batch": args.batch, "crops_per_step": args.batch * (g["sw"] + nb)}  # type: ignore[dict-item]
    return res


def bench_data(args: argparse.Namespace) -> dict[str, float]:
    """Cache size vs input size on phantoms (or --data), and loader volumes/s with --workers processes."""
    from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources
    from vocoslicer.data.phantom import generate_phantom, write_phantom
    from vocoslicer.data.ssl_dataset import VoCoCropDataset, voco_loader
    from vocoslicer.ssl.voco import VoCoGeometry

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = [args.data]
        else:
            for seed in range(args.phantoms):
                write_phantom(generate_phantom(seed, spacing=(1.5, 1.5, 3.0) if not args.tiny else (3, 3, 4)),
                              Path(tmp) / "in")
            data = [str(Path(tmp) / "in")]
        sources = find_sources(data)
        in_bytes = sum(Path(s.path).stat().st_size for s in sources)
        import SimpleITK as sitk

        def voxels(path: str, spacing: float | None) -> int:
            # voxel count of the file, or of the file resampled to ``spacing`` (what preprocessing produces)
            r = sitk.ImageFileReader()
            r.SetFileName(path)
            r.ReadImageInformation()
            n = 1
            for size, sp in zip(r.GetSize(), r.GetSpacing(), strict=True):
                n *= max(1, round(size * sp / spacing)) if spacing else size
            return n

        files = [s.path for s in sources if not Path(s.path).is_dir()]
        in_int16 = sum(2 * voxels(f, None) for f in files)
        pre_int16 = sum(2 * voxels(f, 1.5) for f in files)  # preprocessed int16 before the foreground crop
        cache = VolumeCache(Path(tmp) / "cache", PreprocessConfig())
        t = time.perf_counter()
        entries, bad = cache.prepare(sources)
        prep_s = time.perf_counter() - t
        geo = VoCoGeometry(roi=32, n=2, sw=1, depth=64) if args.tiny else VoCoGeometry()
        ds = VoCoCropDataset(cache, entries, geo, length=10_000)
        loader = voco_loader(ds, args.batch, workers=args.workers)
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        n = 0
        for _ in range(args.loader_batches):
            next(it)
            n += args.batch
        vps = n / (time.perf_counter() - t)
        return {"volumes": len(entries), "bad": len(bad), "input_mb": in_bytes / 1e6, "input_int16_mb": in_int16 / 1e6,
                "pre_int16_mb": pre_int16 / 1e6,
                "cache_mb": cache.size_bytes() / 1e6, "prep_s": prep_s,
                "loader_volumes_per_s": vps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized model/crops (not comparable to GPU numbers)")
    ap.add_argument("--feature-size", type=int, default=48, help="48 = VoCo-B, 96 = L, 192 = H")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--amp", choices=("fp16", "bf16", "off"), default="fp16")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loss-iters", type=int, default=50)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--loader-batches", type=int, default=50)
    ap.add_argument("--phantoms", type=int, default=4)
    ap.add_argument("--data", default=None, help="folder of real volumes for the cache/loader part")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    from vocoslicer.device import pick_device

    dev = pick_device(args.device)
    if dev.type == "cpu" and args.amp == "fp16":
        args.amp = "off"  # fp16 on CPU measures emulation, not anything useful
    lines = []
    loss = bench_loss_only(dev, 2, 2, 9, 1024, args.loss_iters)
    lines.append(f"| loss only (B=2, sw=2, 9 bases, D=1024), fwd+bwd | {loss['vectorised']:.2f} ms | "
                 f"{loss['loop']:.2f} ms | x{loss['loop'] / loss['vectorised']:.1f} faster |")
    lines.append(f"| loss only: aten ops per fwd+bwd (≈ kernel launches on GPU) | {loss['vectorised_ops']:.0f} | "
                 f"{loss['loop_ops']:.0f} | x{loss['loop_ops'] / loss['vectorised_ops']:.0f} fewer |")
    if not args.skip_steps:
        st = bench_steps(args, dev)
        cfg = st.pop("config")
        for key in ("steps_per_s", "volumes_per_s", "peak_gb"):
            ratio = st["vectorised"][key] / st["loop"][key]
            lines.append(f"| step {key} ({cfg}) | {st['vectorised'][key]:.3f} | {st['loop'][key]:.3f} | "
                         f"x{ratio:.2f} |")
    dat = bench_data(args)
    lines.append(f"| cache vs preprocessed int16 ({dat['volumes']} volumes resampled to 1.5 mm) | "
                 f"{dat['cache_mb']:.1f} MB cache | {dat['pre_int16_mb']:.1f} MB | "
                 f"x{dat['cache_mb'] / max(dat['pre_int16_mb'], 1e-9):.2f} (foreground crop) |")
    lines.append(f"| cache vs input files | {dat['cache_mb']:.1f} MB | {dat['input_mb']:.1f} MB on disk "
                 f"({dat['input_int16_mb']:.1f} MB as int16 voxels at native spacing) | "
                 f"x{dat['cache_mb'] / max(dat['input_int16_mb'], 1e-9):.2f} of native int16 |")
    lines.append(f"| preprocessing once | {dat['prep_s']:.1f} s | | |")
    head = f"| loader volumes/s ({args.workers} workers) | {dat['loader_volumes_per_s']:.1f} | "
    if not args.skip_steps:
        need = st["vectorised"]["volumes_per_s"]
        head += f"{need:.2f} needed by the step | headroom x{dat['loader_volumes_per_s'] / need:.1f} |"
    else:
        head += " | |"
    lines.append(head)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}"
    title = (f"### {dt.date.today()} — {dev_name}, {torch.get_num_threads()} threads, torch {torch.__version__}"
             f"{' (tiny CPU config)' if args.tiny else ''}")
    table = "\n".join(["| case | ours (vectorised) | baseline (official loop) | ratio |", "|---|---|---|---|",
                       *lines])
    text = f"{title}\n`python benchmarks/bench_pretrain.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n"
    print(text)
    if args.append:
        res = Path(__file__).with_name("RESULTS.md")
        body = res.read_text() if res.exists() else "# Benchmark results\n"
        heading = "## VoCo pretraining (issue 6)"
        if heading not in body:
            body = body.rstrip() + f"\n\n{heading}\n\n"
        body = body.replace(heading + "\n", heading + "\n\n" + text + "\n", 1)
        res.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
