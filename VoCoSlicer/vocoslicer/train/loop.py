"""The one training loop shared by VoCo/PUMIT pretraining and finetuning.

Everything that is the same for every recipe lives here, so it is written and tested once: AdamW + the official
warmup-cosine schedule, bf16/fp16 autocast (+ GradScaler for fp16), gradient accumulation, optional
``torch.compile``, DDP under ``torchrun`` (NCCL on GPU, gloo on CPU), atomic checkpoints that resume exactly,
events for the GUI, early stopping on a validation metric, and SIGTERM/Ctrl-C → checkpoint → :class:`Cancelled`.
A recipe only supplies ``step_fn(model, batch) -> (loss, parts)`` and its data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vocoslicer.errors import Cancelled, UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.train import distributed as D
from vocoslicer.train.recipes import AMP_CHOICES
from vocoslicer.train.schedule import warmup_cosine
from vocoslicer.train.state import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state

AMP_MODES = AMP_CHOICES  # one list: the --amp choices of every training command


@dataclass
class TrainConfig:
    """Options of :class:`Trainer`; ``steps`` counts optimizer steps (each consumes ``grad_accum`` batches)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    amp: str = "auto"
    grad_accum: int = 1
    grad_clip: float | None = None
    compile: bool = False
    compile_backend: str = "inductor"  # "eager"/"aot_eager" help when debugging compile problems
    compile_mode: str | None = None  # e.g. "max-autotune"
    ckpt_every: int = 500
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    early_stop_patience: int = 0
    select_metric: str | None = None
    select_mode: str = "max"  # "max": higher select_metric is better (dice), "min": lower is better (loss)
    amsgrad: bool = True  # official VoCo AdamW
    fused_optimizer: bool | None = None  # None: fused AdamW on CUDA, default (foreach) elsewhere
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.grad_accum < 1 or self.log_every < 1 or self.ckpt_every < 1:
            raise UserError("training config: steps >= 0, grad_accum >= 1, log_every >= 1, ckpt_every >= 1")
        if self.amp not in AMP_MODES:
            raise UserError(f"training config: amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.select_mode not in ("max", "min"):
            raise UserError(f"training config: select_mode must be 'max' or 'min', got {self.select_mode!r}")


StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` and DDP wrappers (for attributes and state dicts)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) dicts/lists/tuples to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device`` (None = full precision). ``auto``: bf16/fp16 on CUDA, off on CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``step_fn`` over ``data`` (re-iterated forever) and checkpoints them.

    ``step_fn`` receives the wrapped model (DDP/compiled: call it for the forward pass; use :func:`unwrap` for
    attributes). ``eval_fn`` and ``on_best`` run on rank 0 only, with the unwrapped model in eval mode under
    ``no_grad``. ``after_step`` runs on every rank after each optimizer step (EMA updates, stage switches).
    ``extra_state`` objects (``state_dict``/``load_state_dict``) are saved in and restored from checkpoints; their
    states must be tensors/numbers/strings/containers (checkpoints load with ``weights_only=True``).
    ``should_stop`` is polled after every step (pass ``current_job().should_stop`` in a CLI job, whose context
    already routes SIGTERM/SIGINT to it); without it, :meth:`fit` installs its own SIGTERM/SIGINT handlers that
    request a stop, and restores the previous handlers when it returns.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, run_dir: Path | None, step_fn: StepFn, data: Iterable,
                 eval_fn: EvalFn | None = None, events: EventSink | None = None,
                 optimizer: torch.optim.Optimizer | None = None, extra_state: dict[str, Any] | None = None,
                 on_best: Callable[[nn.Module, int, dict[str, float]], None] | None = None,
                 after_step: Callable[[nn.Module, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.ctx, self.device = D.setup(cfg.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.step_fn, self.data, self.eval_fn = step_fn, data, eval_fn
        self.on_best, self.after_step, self.should_stop = on_best, after_step, should_stop
        self.events = events if (events is not None and self.ctx.is_main) else NULL_SINK
        self.extra_state = dict(extra_state or {})
        self._module = model.to(self.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer = optimizer or self._make_optimizer()
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.steps)
        self._eager: nn.Module = self._module
        if self.ctx.distributed:
            self._eager = nn.parallel.DistributedDataParallel(
                self._module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self._wrapped: nn.Module = self._eager
        self._compile_pending = False
        if cfg.compile:
            try:
                self._wrapped = torch.compile(self._eager, backend=cfg.compile_backend, mode=cfg.compile_mode)
                self._compile_pending = True  # compile errors surface at the first call
            except Exception as exc:  # noqa: BLE001 - compile is an optimisation, never a reason to fail
                self.events.warning(f"torch.compile unavailable, training eagerly: {str(exc).splitlines()[0]}")
        self.step = 0
        self.epoch = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self._bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self._stop_requested = False

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        """The unwrapped module (no DDP/compile wrapper)."""
        return self._module

    @property
    def checkpoint_path(self) -> Path | None:
        """``run_dir/checkpoints/last.pt`` (None without a run directory)."""
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and raise :class:`Cancelled` after the current step (thread-safe)."""
        self._stop_requested = True

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``cfg.steps``, early stop or cancel; returns step, best, best_step, history, stopped."""
        cfg = self.cfg
        ckpt = self.checkpoint_path
        if resume and ckpt is not None and ckpt.exists():
            self._load(ckpt)
            self.events.log(f"resumed from {ckpt} at step {self.step}")
        else:
            if resume:
                self.events.warning(f"nothing to resume in {self.run_dir}; starting from step 0")
            seed_everything(cfg.seed + 7919 * self.ctx.rank)  # different data/augmentation stream per rank
        old_handlers = self._install_signal_handlers()
        stopped = "done"
        saved_at = self.step
        finished = False
        try:
            self._module.train()
            batches = self._batches()
            t_start, s_start = time.perf_counter(), self.step
            t_win, s_win, acc_loss, acc_parts = t_start, self.step, 0.0, {}
            while self.step < cfg.steps:
                loss, parts = self._optimizer_step(batches)
                self.step += 1
                if self.after_step is not None:
                    self.after_step(self._module, self.step)
                acc_loss = acc_loss + loss
                for k, v in parts.items():
                    acc_parts[k] = acc_parts.get(k, 0.0) + v
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    self._log_train(self.step - s_win, acc_loss, acc_parts, now - t_win,
                                    (now - t_start) / max(1, self.step - s_start))
                    t_win, s_win, acc_loss, acc_parts = now, self.step, 0.0, {}
                early = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self._evaluate()
                polled = self._stop_requested or (self.should_stop is not None and self.should_stop())
                if D.any_rank(polled, self.ctx, self.device):
                    self._save()
                    raise Cancelled(f"training stopped at step {self.step}; checkpoint saved")
                if early:
                    stopped = "early_stop"
                    self.events.log(f"early stop at step {self.step}: no {cfg.select_metric} improvement in "
                                    f"{cfg.early_stop_patience} evaluations")
                    break
                if self.step % cfg.ckpt_every == 0:
                    self._save()
                    saved_at = self.step
            if self.step != saved_at or not (ckpt and ckpt.exists()):
                self._save()
            finished = True
        finally:
            self._restore_signal_handlers(old_handlers)
            D.teardown(self.ctx, sync=finished)
        return {"step": self.step, "best": self.best, "best_step": self.best_step, "history": self.history,
                "stopped": stopped}

    # ------------------------------------------------------------------ internals
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self._module.parameters() if p.requires_grad]
        fused = self.cfg.fused_optimizer if self.cfg.fused_optimizer is not None else self.device.type == "cuda"
        kwargs = {"lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay, "amsgrad": self.cfg.amsgrad}
        if fused:
            try:
                return torch.optim.AdamW(params, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError) as exc:
                self.events.warning(f"fused AdamW unavailable, using the default: {str(exc).splitlines()[0]}")
        return torch.optim.AdamW(params, **kwargs)

    def _batches(self) -> Iterator[Any]:
        while True:
            sampler = getattr(self.data, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            n = 0
            for batch in self.data:
                n += 1
                yield batch
            if n == 0:
                raise UserError("training data: the dataset yielded no batches")
            self.epoch += 1

    def _optimizer_step(self, batches: Iterator[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            result = self._accumulate(batches)
        except Exception as exc:
            if not self._compile_pending:
                raise
            self.events.warning(f"torch.compile failed, training eagerly: {str(exc).splitlines()[0][:300]}")
            self._wrapped, self._compile_pending = self._eager, False
            result = self._accumulate(batches)
        self._compile_pending = False
        return result

    def _accumulate(self, batches: Iterator[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        parts_sum: dict[str, Any] = {}
        for micro in range(cfg.grad_accum):
            batch = move_to_device(next(batches), self.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.ctx.distributed) else self._eager.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, parts = self.step_fn(self._wrapped, batch)
                scaled = loss.float() / cfg.grad_accum
                self.scaler.scale(scaled).backward()
            total = total + loss.detach().float() / cfg.grad_accum
            for k, v in parts.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._module.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():  # GradScaler skipping an overflow step makes torch warn about the order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return total, parts_sum

    def _log_train(self, n: int, loss_sum: Any, parts_sum: dict[str, Any], window_s: float,
                   s_per_step: float) -> None:
        keys = sorted(parts_sum)
        local = [float(loss_sum) / n] + [float(parts_sum[k]) / n for k in keys]  # one device sync per log
        values = D.mean_over_ranks(local, self.ctx, self.device)
        parts = dict(zip(keys, values[1:], strict=True))
        extra: dict[str, Any] = {}
        if self.device.type == "cuda":
            extra["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        lr = self.optimizer.param_groups[0]["lr"]
        sps = n / window_s if window_s > 0 else None
        self.events.metric(self.step, split="train", loss=values[0], lr=lr, steps_per_s=sps, **parts, **extra)
        self.events.progress(self.step, self.cfg.steps, stage="train",
                             eta_s=round(s_per_step * (self.cfg.steps - self.step), 1))
        self.history.append({"step": self.step, "split": "train", "loss": values[0], "lr": lr, **parts})

    def _evaluate(self) -> bool:
        """Run eval_fn on rank 0; returns True (on every rank) when early stopping should end the run."""
        cfg = self.cfg
        stop = False
        if self.ctx.is_main and self.eval_fn is not None:
            self._module.eval()
            try:
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in self.eval_fn(self._module, self.step).items()}
            finally:
                self._module.train()
            self.events.metric(self.step, split="val", **metrics)
            self.history.append({"step": self.step, "split": "val", **metrics})
            value = metrics.get(cfg.select_metric) if cfg.select_metric else None
            if cfg.select_metric and value is None:
                self.events.warning(f"eval_fn did not return {cfg.select_metric!r}; no model selection")
            elif value is not None:
                better = self.best is None or (value > self.best if cfg.select_mode == "max" else value < self.best)
                if better:
                    self.best, self.best_step, self._bad_evals = value, self.step, 0
                    if self.on_best is not None:
                        self.on_best(self._module, self.step, metrics)
                else:
                    self._bad_evals += 1
                stop = cfg.early_stop_patience > 0 and self._bad_evals >= cfg.early_stop_patience
        return D.any_rank(stop, self.ctx, self.device)

    def _save(self) -> None:
        rngs = D.gather_to_main(rng_state(), self.ctx)  # collective: every rank takes part
        path = self.checkpoint_path
        if not self.ctx.is_main or path is None:
            return
        payload = {
            "format": "vocoslicer-train-1",
            "step": self.step, "epoch": self.epoch, "best": self.best, "best_step": self.best_step,
            "bad_evals": self._bad_evals, "history": self.history, "world_size": self.ctx.world_size,
            "config": dataclasses.asdict(self.cfg),
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "extra": {k: obj.state_dict() for k, obj in self.extra_state.items()},
            "rng": rngs,
        }
        save_checkpoint(payload, path)
        self.events.artifact(path, "checkpoint", step=self.step)

    def _load(self, path: Path) -> None:
        try:
            ck = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt/unknown file is a user-facing problem
            raise UserError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from exc
        self._module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        for fn in self.scheduler.lr_lambdas:  # the schedule follows the current config (e.g. more --steps)
            if hasattr(fn, "total_steps"):
                fn.warmup_steps, fn.total_steps = self.cfg.warmup_steps, self.cfg.steps
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        for key, obj in self.extra_state.items():
            if key in ck.get("extra", {}):
                obj.load_state_dict(ck["extra"][key])
        self.step, self.epoch = int(ck["step"]), int(ck.get("epoch", 0))
        self.best, self.best_step = ck.get("best"), ck.get("best_step")
        self._bad_evals = int(ck.get("bad_evals", 0))
        self.history = list(ck.get("history", []))
        rngs = ck.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:  # another world size: fresh but deterministic streams
            seed_everything(self.cfg.seed + 7919 * self.ctx.rank + 104729 * self.step)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if self.should_stop is not None or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested and signum == signal.SIGINT:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)
