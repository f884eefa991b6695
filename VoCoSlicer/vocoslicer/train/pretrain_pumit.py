"""PUMIT pretraining recipes on the shared :class:`~vocoslicer.train.loop.Trainer`: visual tokenizer, then MIM.

Tokenizer (spec §2.4-2.5): the Trainer optimises the tokenizer (generator); the patch discriminator has its own
AdamW, schedule and (fp16) scaler, updated inside the step function and saved through ``extra_state``. Order per
step as in the official code: G forward -> G loss with the *pre-update* discriminator (a detached parameter copy,
so D gets no gradient from it) -> D hinge step on detached (x, x̂) -> gate update; the Trainer then steps G.
MIM (spec §4): frozen tokenizer produces soft-token targets; ViT + mask token + head learns them on 55 % masks.
Data for both: same-DA batches of crops from :mod:`vocoslicer.data.anisotropy`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from vocoslicer.contracts.torchrun import env_rank, env_world_size
from vocoslicer.data.anisotropy import DACropDataset, SameDABatchSampler, VolumeItem, collate_same_da
from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle, load_state_dict_file, new_bundle_meta
from vocoslicer.models.pumit.discriminator import PatchDiscriminator
from vocoslicer.models.pumit.mim import IMAGENET_MEAN, IMAGENET_STD, PumitMIM
from vocoslicer.models.pumit.perceptual import PerceptualLoss, build_perceptual
from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig
from vocoslicer.models.pumit.vit import PumitViT, param_groups, vit_config
from vocoslicer.ssl import pumit as P
from vocoslicer.train.loop import TrainConfig, Trainer, unwrap
from vocoslicer.train.recipes import MIM, TOKENIZER
from vocoslicer.train.schedule import warmup_cosine
from vocoslicer.train.state import load_checkpoint

TOKENIZER_CONFIG_JSON = "tokenizer_config.json"


@dataclass
class TokenizerRecipe:
    """Loss weights and discriminator settings (official defaults, README recipe λ_q 0.03, λ_e 1)."""

    quant_weight: float = P.QUANT_WEIGHT
    entropy_weight: float = P.ENTROPY_WEIGHT
    perceptual_weight: float = TOKENIZER.perceptual_weight
    perceptual: str = TOKENIZER.perceptual  # or "lpips:VGG16_WEIGHTS,LPIPS_LIN_WEIGHTS" (local files)
    gan_weight: float = P.GAN_WEIGHT
    gan_threshold: float = P.GAN_THRESHOLD
    d_lr: float = TOKENIZER.d_lr
    d_channels: tuple[int, ...] = (128, 256, 512)


def make_loader(items: list[VolumeItem], batch_size: int, tokens_z: int, tokens_xy: int, stride: int, seed: int,
                channels: int = 3, workers: int = 0, augment: bool = True) -> tuple[Any, SameDABatchSampler]:
    """DataLoader of same-DA batches for this rank (torchrun's RANK/WORLD_SIZE), plus its sampler."""
    rank, world = env_rank(), env_world_size()
    sampler = SameDABatchSampler([it.shape for it in items], [it.spacing for it in items], batch_size, tokens_z,
                                 tokens_xy, stride, seed=seed, rank=rank, world_size=world)
    # its own generator: creating the loader's iterator must not consume the global RNG that resume restores
    loader = torch.utils.data.DataLoader(DACropDataset(items, channels, augment), batch_sampler=sampler,
                                         collate_fn=collate_same_da, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler


class _SamplerResume:
    """Checkpoints how many batches this rank consumed, so a resumed run continues the same data stream."""

    def __init__(self, loader: Any, sampler: SameDABatchSampler, grad_accum: int) -> None:
        self.loader, self.sampler, self.grad_accum = loader, sampler, grad_accum
        self.trainer: Trainer | None = None

    def state_dict(self) -> dict[str, int]:
        return {"batches": int(self.trainer.step * self.grad_accum) if self.trainer else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.start_batch = int(state["batches"])
        if self.loader.generator is not None:  # worker seeds continue deterministically too
            self.loader.generator.manual_seed(self.sampler.seed * 1_000_003 + self.sampler.start_batch)


class _Discriminator:
    """The discriminator side of tokenizer training: module, optimizer, schedule, scaler and GAN gate."""

    def __init__(self, disc: PatchDiscriminator, cfg: TrainConfig, recipe: TokenizerRecipe) -> None:
        self.module, self.cfg, self.recipe = disc, cfg, recipe
        self.gate = P.GanGate(recipe.gan_threshold)
        self.wrapped: nn.Module = disc
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: Any = None

    def attach(self, trainer: Trainer) -> None:
        """Move to the trainer's device and build the optimizer there (before any checkpoint is loaded)."""
        self.module.to(trainer.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, self.cfg.weight_decay), lr=self.recipe.d_lr)
        self.scheduler = warmup_cosine(self.optimizer, self.cfg.warmup_steps, self.cfg.steps)
        self.scaler = torch.amp.GradScaler(trainer.device.type, enabled=trainer.amp_dtype == torch.float16)
        if trainer.ctx.distributed:
            ids = [trainer.device.index] if trainer.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)

    def frozen_logits(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        """D(x) with a detached copy of the current weights: gradients reach x only, and the D step may follow."""
        params = {k: v.detach().clone() for k, v in self.module.named_parameters()}
        return functional_call(self.module, params, (x, aniso_d))

    def step(self, x: torch.Tensor, x_rec: torch.Tensor, aniso_d: int) -> torch.Tensor:
        """One hinge update on detached inputs; returns the loss averaged over ranks and feeds the gate."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = P.hinge_d_loss(self.wrapped(x.detach(), aniso_d), self.wrapped(x_rec.detach(), aniso_d))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        value = loss.detach().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
            value = value / dist.get_world_size()
        self.gate.update(float(value))
        return value

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gate.load_state_dict(state["gate"])


def tokenizer_step_fn(disc: _Discriminator, perceptual: PerceptualLoss, recipe: TokenizerRecipe):  # noqa: ANN201
    """``step_fn(model, batch)`` for the Trainer: generator loss (returned) + discriminator update (done here)."""

    def step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"] * 2 - 1
        da = int(batch["aniso_d"])
        out = model(x, da)
        x_rec = out["x_rec"]
        rec = (x.float() - x_rec.float()).abs().mean()
        perc = perceptual(x, x_rec) if recipe.perceptual_weight else x_rec.new_zeros((), dtype=torch.float32)
        pdr = P.prior_regularizer(out["q"], recipe.quant_weight, recipe.entropy_weight)
        loss = rec + recipe.perceptual_weight * perc + pdr["loss"]
        gate_open = disc.gate.open
        adv = torch.zeros((), device=x.device)
        if gate_open:
            adv = P.generator_adv_loss(disc.frozen_logits(x_rec, da))
            loss = loss + recipe.gan_weight * adv
        d_loss = disc.step(x, x_rec, da)
        q = out["q"].detach().reshape(-1, out["q"].shape[-1])
        used = (torch.bincount(q.argmax(-1), minlength=q.shape[-1]) > 0).sum()
        parts = {"rec": rec.detach(), "perceptual": perc.detach(), "quant": pdr["quant"].detach(),
                 "entropy": pdr["entropy"].detach(), "gan_g": adv.detach(), "d_loss": d_loss,
                 "gan_on": float(gate_open), "codebook_usage": used.float() / q.shape[0], "codes_used": used.float()}
        return loss, parts

    return step


def _job_events(events: EventSink | None) -> EventSink:
    return events if events is not None else NULL_SINK


def _write_json(path: Path, data: dict) -> None:
    from vocoslicer.io.atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def train_tokenizer(items: list[VolumeItem], run_dir: Path, tok_cfg: TokenizerConfig, cfg: TrainConfig,
                    recipe: TokenizerRecipe | None = None, batch_size: int = 8, tokens_z: int = 4,
                    tokens_xy: int = 8, resume: bool = False, events: EventSink | None = None,
                    workers: int = 0, should_stop: Any = None) -> dict[str, Any]:
    """Train the tokenizer; returns the Trainer result plus ``bundle`` (run_dir/tokenizer) on completion."""
    recipe = recipe or TokenizerRecipe()
    run_dir = Path(run_dir)
    _write_json(run_dir / TOKENIZER_CONFIG_JSON, {"tokenizer": tok_cfg.to_dict(), "recipe": vars(recipe)})
    torch.manual_seed(cfg.seed)
    tok = PumitTokenizer(tok_cfg)
    disc = _Discriminator(PatchDiscriminator(tok_cfg.in_channels, recipe.d_channels), cfg, recipe)
    perceptual = build_perceptual(recipe.perceptual, tok_cfg.in_channels, seed=cfg.seed)
    loader, sampler = make_loader(items, batch_size, tokens_z, tokens_xy, tok_cfg.stride, cfg.seed,
                                  tok_cfg.in_channels, workers)
    resumer = _SamplerResume(loader, sampler, cfg.grad_accum)
    optimizer = torch.optim.AdamW(param_groups(tok, cfg.weight_decay), lr=cfg.lr)
    trainer = Trainer(tok, cfg, run_dir, tokenizer_step_fn(disc, perceptual, recipe), loader,
                      events=_job_events(events), optimizer=optimizer,
                      extra_state={"discriminator": disc, "sampler": resumer}, should_stop=should_stop)
    resumer.trainer = trainer
    disc.attach(trainer)
    perceptual.to(trainer.device)
    result = trainer.fit(resume=resume)
    if trainer.ctx.is_main:
        result["bundle"] = str(export_tokenizer(trainer.model, run_dir / "tokenizer", trainer.step, items))
        _job_events(events).artifact(result["bundle"], "model", task="backbone", architecture="pumit_tokenizer")
    return result


def export_tokenizer(tok: PumitTokenizer, out: Path, step: int, items: list[VolumeItem]) -> Path:
    """Save the tokenizer as a bundle (task "backbone", architecture "pumit_tokenizer")."""
    meta = new_bundle_meta("pumit-tokenizer", "1.0.0", "backbone", "pumit_tokenizer", tok.cfg.to_dict(),
                           preprocessing={"value_range": [0, 1], "model_input": "2x-1", "channels": tok.cfg.in_channels,
                                          "depth_first": True},
                           training={"method": "pumit-tokenizer", "steps": step, "images": len(items)})
    return ModelBundle(meta=meta).save(out, tok.state_dict(), overwrite=True)


def load_tokenizer(spec: str | Path) -> PumitTokenizer:
    """A tokenizer from a bundle folder, a tokenizer run directory (its bundle or its last checkpoint)."""
    p = Path(spec)
    if (p / "model.json").is_file() or (p.is_file() and p.suffix == ".zip"):
        bundle = ModelBundle.load(p)
    elif (p / "tokenizer" / "model.json").is_file():
        bundle = ModelBundle.load(p / "tokenizer")
    elif (p / TOKENIZER_CONFIG_JSON).is_file() and (p / "checkpoints" / "last.pt").is_file():
        cfg = json.loads((p / TOKENIZER_CONFIG_JSON).read_text(encoding="utf-8"))["tokenizer"]
        tok = PumitTokenizer(TokenizerConfig(**cfg))
        tok.load_state_dict(load_checkpoint(p / "checkpoints" / "last.pt")["model"])
        return tok
    else:
        raise UserError(f"{p}: not a tokenizer bundle or tokenizer run directory")
    name, args = bundle.architecture
    if name != "pumit_tokenizer":
        raise UserError(f"{p}: bundle holds architecture {name!r}, not a PUMIT tokenizer")
    tok = PumitTokenizer(TokenizerConfig(**args))
    tok.load_state_dict(load_state_dict_file(bundle.weights_path))
    return tok


def mim_step_fn(tokenizer: PumitTokenizer, mask_ratio: float = P.MASK_RATIO):  # noqa: ANN201
    """``step_fn(model, batch)``: soft-token targets from the frozen tokenizer, CE on masked positions."""
    mean = torch.tensor(IMAGENET_MEAN[: tokenizer.cfg.in_channels]).view(1, -1, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD[: tokenizer.cfg.in_channels]).view(1, -1, 1, 1, 1)

    def step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x01 = batch["image"]
        da = int(batch["aniso_d"])
        with torch.no_grad():
            q = tokenizer.tokenize(x01 * 2 - 1, da)["q"].flatten(1, 3)  # (N, L, K), (d, h, w) row-major
        n, length = q.shape[:2]
        mask = P.random_mim_mask(n, length, mask_ratio, device=x01.device)
        x = (x01 - mean.to(x01.device)) / std.to(x01.device)
        logits = model(x, da, mask)
        target = q[mask]
        loss = P.mim_loss(logits, target)
        return loss, {"kl": P.mim_kl(logits, target), "masked": mask.float().mean()}

    return step


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of an EVA-02 (``module``), Lightning (``state_dict``), Fabric (``model``) checkpoint or bundle."""
    p = Path(path)
    if (p / "model.json").is_file():
        return ModelBundle.load(p).state_dict()
    if p.suffix == ".safetensors":
        return load_state_dict_file(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a bad file for the user
        raise UserError(f"{p}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") \
            from None
    for key in ("module", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{p}: not a checkpoint of tensors")
    return obj


def train_mim(items: list[VolumeItem], run_dir: Path, tokenizer: PumitTokenizer, cfg: TrainConfig, size: str = "B",
              batch_size: int = MIM.batch, tokens_z: int = 5, tokens_xy: int = 10, mask_ratio: float = P.MASK_RATIO,
              mask_layer_start: int | None = None, resume: bool = False, events: EventSink | None = None,
              workers: int = 0, should_stop: Any = None, vit_overrides: dict | None = None,
              init: str | Path | None = None) -> dict[str, Any]:
    """MIM pretraining of a ViT (optionally initialised from ``init``: EVA-02 or PUMIT weights); exports the
    backbone bundle (run_dir/backbone) on completion."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    vcfg = vit_config(size, in_channels=tokenizer.cfg.in_channels, patch_size=tokenizer.stride,
                      pos_embed_shape=(tokens_z, tokens_xy, tokens_xy), **(vit_overrides or {}))
    start = (18 if size == "L" else 0) if mask_layer_start is None else mask_layer_start
    model = PumitMIM(PumitViT(vcfg), tokenizer.cfg.codebook_size, start)
    if init is not None and not resume:
        try:
            missing = model.load_pretrained(read_state_dict(init))
        except ValueError as exc:
            raise UserError(f"{init}: does not fit a ViT-{size} ({exc})") from None
        if len(missing) == len(model.vit.state_dict()):
            raise UserError(f"{init}: no ViT weights found (is it a ViT-{size} checkpoint?)")
        _job_events(events).log(f"initialised from {init}; {len(missing)} ViT tensors kept their initialisation")
    tokenizer.requires_grad_(False).eval()
    loader, sampler = make_loader(items, batch_size, tokens_z, tokens_xy, tokenizer.stride, cfg.seed,
                                  tokenizer.cfg.in_channels, workers)
    resumer = _SamplerResume(loader, sampler, cfg.grad_accum)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    trainer = Trainer(model, cfg, run_dir, mim_step_fn(tokenizer, mask_ratio), loader, events=_job_events(events),
                      optimizer=optimizer, extra_state={"sampler": resumer}, should_stop=should_stop)
    resumer.trainer = trainer
    tokenizer.to(trainer.device)
    result = trainer.fit(resume=resume)
    if trainer.ctx.is_main:
        vit = unwrap(trainer.model).vit
        result["bundle"] = str(export_backbone(vit, run_dir / "backbone", trainer.step, items, mask_ratio))
        _job_events(events).artifact(result["bundle"], "model", task="backbone", architecture="pumit_vit")
    return result


def export_backbone(vit: PumitViT, out: Path, step: int, items: list[VolumeItem], mask_ratio: float) -> Path:
    """Save the pre-trained ViT (EVA-02 key names at the root) as a "backbone" bundle for finetune/classify."""
    meta = new_bundle_meta("pumit-vit", "1.0.0", "backbone", "pumit_vit", vit.cfg.to_dict(),
                           preprocessing={"value_range": [0, 1], "normalization": "imagenet",
                                          "channels": vit.cfg.in_channels, "depth_first": True},
                           downstream={"classification": "pumit_vit_cls", "segmentation": "pumit_vit_seg"},
                           training={"method": "pumit-mim", "steps": step, "images": len(items),
                                     "mask_ratio": mask_ratio})
    return ModelBundle(meta=meta).save(out, vit.state_dict(), overwrite=True)
