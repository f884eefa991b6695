"""Default values of the pretraining recipes (VoCo v2, PUMIT tokenizer, PUMIT MIM), written down once.

Why a module of its own: the CLI flags (``vocoslicer pretrain voco|tokenizer|mim``), their help texts, the
training dataclasses (:class:`~vocoslicer.train.pretrain_voco.VoCoRecipe`,
:class:`~vocoslicer.train.pretrain_pumit.TokenizerRecipe`), the VoCo preprocessing cache and the PUMIT loss
functions all read the same numbers. Building the CLI parser must never import torch, and the training code does,
so the numbers live here: standard library only, frozen dataclasses, one instance per method.
"""

from __future__ import annotations

from dataclasses import dataclass

AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # --amp of every training command (the loop's AMP modes)


@dataclass(frozen=True)
class PretrainDefaults:
    """The schedule every pretraining method has; the first four values are each method's own (its paper's)."""

    steps: int
    batch: int
    lr: float
    weight_decay: float
    warmup_fraction: float = 0.1  # of --steps, when --warmup is not given
    seed: int = 0
    workers: int = 2
    grad_accum: int = 1
    ckpt_every: int = 1000
    log_every: int = 10
    amp: str = "auto"
    device: str = "auto"

    def warmup_steps(self, steps: int) -> int:
        """Warmup steps of a run of ``steps`` optimizer steps without ``--warmup``."""
        return round(self.warmup_fraction * steps)

    def warmup_help(self) -> str:
        """How :meth:`warmup_steps` chooses, for the ``--warmup`` help text."""
        return f"{self.warmup_fraction * 100:.3g}% of --steps"


@dataclass(frozen=True)
class VoCoDefaults(PretrainDefaults):
    """VoCo v2 (official recipe: 2,000,000 steps on 8 GPUs; batch 2, 2 random crops, 3×3 base crops of 64³)."""

    steps: int = 100_000
    batch: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    workers: int = 4
    warmup_max: int = 5000  # warmup: min(warmup_max, steps // 10)
    size: str = "B"
    sw: int = 2
    crop: int = 64
    grid: int = 3
    spacing: float = 1.5  # mm, isotropic
    a_min: float = -175.0  # HU window (abdomen; chest CT officially -1000,500)
    a_max: float = 250.0
    cache_dtype: str = "int16"

    def warmup_steps(self, steps: int) -> int:  # noqa: D102 - see PretrainDefaults
        return min(self.warmup_max, steps // 10)

    def warmup_help(self) -> str:  # noqa: D102 - see PretrainDefaults
        return f"min({self.warmup_max}, steps/10)"


@dataclass(frozen=True)
class TokenizerDefaults(PretrainDefaults):
    """PUMIT tokenizer (official code's README recipe: λ_q 0.03, λ_e 1)."""

    steps: int = 500_000
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 2333
    crop: str = "64,128"
    size: str = "paper"
    d_lr: float = 1e-3
    quant_weight: float = 0.03  # λ_q, codebook diversity
    entropy_weight: float = 1.0  # λ_e, token sharpness
    perceptual_weight: float = 1.0
    perceptual: str = "random"


@dataclass(frozen=True)
class MimDefaults(PretrainDefaults):
    """PUMIT masked image modelling (paper: 300k steps, 10k warmup, 55 % masks, ViT-B)."""

    steps: int = 300_000
    batch: int = 14
    lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_fraction: float = 10_000 / 300_000
    seed: int = 666
    crop: str = "80,160"
    size: str = "B"
    mask_ratio: float = 0.55
    grad_clip: float = 0.5


VOCO = VoCoDefaults()
TOKENIZER = TokenizerDefaults()
MIM = MimDefaults()
