"""Learning-rate schedules used by the shared training loop.

The official VoCo code steps a ``WarmupCosineSchedule`` every iteration: linear warmup from 0 to the base LR, then
half a cosine down to 0 at ``total`` steps (voco_spec.md §4.1). Reproducing it exactly keeps our runs comparable
with the published ones.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear 0→1 over ``warmup_steps``, cosine 1→0 after."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class _WarmupCosine:
    """A callable object, not a lambda: LambdaLR saves its plain attributes in the scheduler state_dict."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The official VoCo ``WarmupCosineSchedule`` as a ``LambdaLR`` (step it once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps))
