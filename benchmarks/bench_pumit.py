"""PUMIT training throughput: tokenizer and MIM optimizer steps per second on the shared Trainer.

Every number comes from the real recipe (``vocoslicer.train.pretrain_pumit`` step functions, the shared Trainer
with its AMP, the discriminator update and GAN gate) fed with an in-memory synthetic batch, so data loading is
excluded. Baselines measured in the same run, reported as ratios:

- thick slices vs isotropic: the same token grid from a DA-2 crop (4x fewer slices) — what SAC saves;
- SAC vs plain conv path (``adaptive=False``) on isotropic input — SAC's overhead where it has nothing to adapt;
- bf16 autocast vs fp32 (GPU only).

CPU: a reduced "bench" size, one thread, timed in process CPU time (steps per CPU-second), so that other jobs on
a shared machine do not distort the ratios. GPU: the paper sizes (tokenizer 128/256/512, K 1024; ViT-B).
``--append`` adds the table to benchmarks/RESULTS.md under "PUMIT (issue 7)".
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import platform
import sys
import time
from pathlib import Path

import torch

from vocoslicer.models.pumit.discriminator import PatchDiscriminator
from vocoslicer.models.pumit.mim import PumitMIM
from vocoslicer.models.pumit.perceptual import build_perceptual
from vocoslicer.models.pumit.sac import SacConv3d, SacTransposedConv3d
from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig
from vocoslicer.models.pumit.vit import PumitViT, param_groups, vit_config
from vocoslicer.train.loop import TrainConfig, Trainer
from vocoslicer.train.pretrain_pumit import TokenizerRecipe, _Discriminator, mim_step_fn, tokenizer_step_fn

SIZES = {
    "bench": {"tok": {"channels": (16, 32, 32), "codebook_size": 128, "embed_dim": 32, "groups": 4},
              "d_channels": (16, 32, 32), "perceptual": "random:8,16", "vit": ("tiny", {"embed_dim": 64, "depth": 4}),
              "iso": (32, 64, 64), "thick": (8, 64, 64), "batch": 2},
    "paper": {"tok": {}, "d_channels": (128, 256, 512), "perceptual": "random", "vit": ("B", {}),
              "iso": (64, 128, 128), "thick": (16, 128, 128), "mim_iso": (80, 160, 160), "mim_thick": (20, 160, 160),
              "tok_batch": 8, "mim_batch": 14},
}


def _timed_fit(model, step_fn, batch, amp: str, device: str, warmup: int, steps: int, extra=None, setup=None,
               optimizer=None) -> float:
    """Steps/s of ``steps`` optimizer steps after ``warmup``, timed with after_step callbacks."""
    stamps: list[float] = []

    def after(_m, _s) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        else:  # CPU: this process's CPU time, immune to other jobs sharing the cores (1 thread, see main)
            stamps.append(time.process_time())

    cfg = TrainConfig(steps=warmup + steps, lr=1e-4, weight_decay=0.05, amp=amp, device=device, amsgrad=False,
                      log_every=10**6, ckpt_every=10**6)
    trainer = Trainer(model, cfg, None, step_fn, _Repeat(batch), optimizer=optimizer, extra_state=extra,
                      after_step=after)
    if setup is not None:
        setup(trainer)
    trainer.fit()
    return steps / (stamps[-1] - stamps[warmup - 1])


class _Repeat:
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        return itertools.repeat(self.batch)


def bench_tokenizer(size: dict, crop, da: int, amp: str, device: str, warmup: int, steps: int,
                    adaptive: bool = True) -> float:
    torch.manual_seed(0)
    tok = PumitTokenizer(TokenizerConfig(**size["tok"]))
    if not adaptive:
        for m in tok.modules():
            if isinstance(m, (SacConv3d, SacTransposedConv3d)):
                m.adaptive = False
    recipe = TokenizerRecipe(perceptual=size["perceptual"], d_channels=size["d_channels"])
    cfg = TrainConfig(steps=warmup + steps, weight_decay=0.05)
    disc = _Discriminator(PatchDiscriminator(3, recipe.d_channels), cfg, recipe)
    perceptual = build_perceptual(recipe.perceptual)
    batch = {"image": torch.rand(size.get("tok_batch", size.get("batch")), 3, *crop), "aniso_d": da}

    def setup(trainer: Trainer) -> None:
        disc.attach(trainer)
        perceptual.to(trainer.device)

    opt = torch.optim.AdamW(param_groups(tok, 0.05), lr=1e-4)
    return _timed_fit(tok, tokenizer_step_fn(disc, perceptual, recipe), batch, amp, device, warmup, steps,
                      extra={"discriminator": disc}, setup=setup, optimizer=opt)


def bench_mim(size: dict, crop, da: int, amp: str, device: str, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    tok = PumitTokenizer(TokenizerConfig(**size["tok"])).requires_grad_(False).eval()
    name, over = size["vit"]
    tokens = (crop[0] // max(16 >> da, 1), crop[1] // 16, crop[2] // 16)
    model = PumitMIM(PumitViT(vit_config(name, pos_embed_shape=tokens, **over)), tok.cfg.codebook_size)
    batch = {"image": torch.rand(size.get("mim_batch", size.get("batch")), 3, *crop), "aniso_d": da}
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    return _timed_fit(model, mim_step_fn(tok), batch, amp, device, warmup, steps,
                      setup=lambda t: tok.to(t.device), optimizer=opt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", choices=tuple(SIZES), default=None, help="default: paper on GPU, bench on CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each case is kept")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    from vocoslicer.device import pick_device

    cuda = pick_device(args.device).type == "cuda"
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # CPU numbers are steps per CPU-second of one thread
    size_name = args.size or ("paper" if cuda else "bench")
    size = SIZES[size_name]
    iso, thick = size["iso"], size["thick"]
    mim_iso, mim_thick = size.get("mim_iso", iso), size.get("mim_thick", thick)
    w, n = args.warmup, args.steps
    amps = ("off", "bf16") if cuda else ("off",)
    cases: dict[str, object] = {}
    for amp in amps:
        tag = f"amp={amp}"
        cases[f"tokenizer {size_name} iso {iso} DA0 {tag}"] = (bench_tokenizer, (size, iso, 0, amp, device, w, n))
        cases[f"tokenizer {size_name} thick {thick} DA2 {tag}"] = (bench_tokenizer, (size, thick, 2, amp, device, w, n))
        cases[f"tokenizer {size_name} iso plain-conv path {tag}"] = (bench_tokenizer,
                                                                     (size, iso, 0, amp, device, w, n, False))
        cases[f"MIM {size_name} iso {mim_iso} DA0 {tag}"] = (bench_mim, (size, mim_iso, 0, amp, device, w, n))
        cases[f"MIM {size_name} thick {mim_thick} DA2 {tag}"] = (bench_mim, (size, mim_thick, 2, amp, device, w, n))
    best: dict[str, float] = {}
    for r in range(args.repeats):  # interleaved repeats, best of each: robust to load from other processes
        for name, (fn, fn_args) in cases.items():
            value = fn(*fn_args)
            best[name] = max(best.get(name, 0.0), value)
            print(f"[{r + 1}/{args.repeats}] {name:<58} {value:8.3f} steps/s", flush=True)
    rows: list[tuple[str, float, str]] = []
    for amp in amps:
        t_iso = best[f"tokenizer {size_name} iso {iso} DA0 amp={amp}"]
        m_iso = best[f"MIM {size_name} iso {mim_iso} DA0 amp={amp}"]
        for name, value in best.items():
            if not name.endswith(f"amp={amp}"):
                continue
            base = ""
            if "thick" in name:
                base = f"x{value / (t_iso if name.startswith('tokenizer') else m_iso):.2f} vs iso (same token grid)"
            elif "plain-conv" in name:
                base = f"SAC/plain = {t_iso / value:.2f}"
            rows.append((name, value, base))
    if cuda:
        for what, crop in (("tokenizer", iso), ("MIM", mim_iso)):
            fp32 = best[f"{what} {size_name} iso {crop} DA0 amp=off"]
            bf16 = best[f"{what} {size_name} iso {crop} DA0 amp=bf16"]
            rows.append((f"{what} bf16 vs fp32 (iso), ratio", bf16 / fp32, "bf16/fp32"))
    for name, value, base in rows:
        print(f"{name:<58} {value:8.3f} {base}")
    if args.append:
        dev = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
            f"{torch.get_num_threads()} threads)"
        lines = ["", f"### {dt.date.today().isoformat()} — {dev}, torch {torch.__version__}",
                 f"`{' '.join(['python', *sys.argv])}` (synthetic in-memory batches; "
                 f"{w} warmup + {n} timed steps, best of {args.repeats} interleaved repeats; batch "
                 f"{size.get('batch') or size.get('tok_batch')}/{size.get('batch') or size.get('mim_batch')} "
                 "tokenizer/MIM)", "",
                 f"| case | {'steps/s' if cuda else 'steps per CPU-second (1 thread)'} | baseline |", "|---|---|---|"]
        lines += [f"| {a} | {b:.3f} | {c} |" for a, b, c in rows]
        if not cuda:
            lines += ["", "GPU numbers (paper sizes, bf16 vs fp32) pending: no GPU in this session; run "
                      "`python benchmarks/bench_pumit.py --append` on a CUDA machine."]
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
        if "## PUMIT (issue 7)" not in text:
            text += "\n## PUMIT (issue 7)\n"
        head, _, tail = text.partition("## PUMIT (issue 7)\n")
        nxt = tail.find("\n## ")
        section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
        path.write_text(head + "## PUMIT (issue 7)\n" + section.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + rest,
                        encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
