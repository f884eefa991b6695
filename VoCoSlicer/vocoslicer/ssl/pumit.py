"""PUMIT self-supervision: soft tokens, prior-distribution regulariser, tokenizer GAN losses and gate, MIM masking.

Pure tensor functions (no model code) so they can be tested on hand-computable distributions. Spec §2.2-§2.4, §4.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vocoslicer.train.recipes import MIM, TOKENIZER

QUANT_WEIGHT = TOKENIZER.quant_weight  # λ_q, README recipe of the official code
ENTROPY_WEIGHT = TOKENIZER.entropy_weight  # λ_e
GAN_WEIGHT = 3e-3
GAN_THRESHOLD = 0.025
GAN_EMA_MOMENTUM = 0.9
GAN_EMA_INIT = 0.1
MASK_RATIO = MIM.mask_ratio


def soft_tokens(logits: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft token: q = softmax(logits) (T = 1) and the expectation e = Σ_k q(k) E_k over the codebook.

    ``logits`` (..., K) channels-last, ``codebook`` (K, D). Returns (q, e) with e of shape (..., D). The softmax
    is taken in fp32 so bf16/fp16 autocast cannot underflow the small probabilities the entropy term needs.
    """
    q = logits.float().softmax(-1)
    e = q.to(codebook.dtype) @ codebook
    return q, e


def _global_mean(local: torch.Tensor) -> torch.Tensor:
    """Mean over ranks whose *value* is global while the gradient flows through the local term only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return local + (total / dist.get_world_size() - local.detach())


def prior_regularizer(q: torch.Tensor, quant_weight: float = QUANT_WEIGHT,
                      entropy_weight: float = ENTROPY_WEIGHT) -> dict[str, torch.Tensor]:
    """Extended prior-distribution regularisation (paper eq. 4).

    ``q`` (..., K): token distributions of every position. p̄ = mean of q over batch, grid (and ranks);
    L_quant = Σ p̄ log p̄ (minimised -> diverse codebook use), L_ent = mean_x H(q_x) (minimised -> sharp tokens).
    Returns the weighted sum ``loss`` and both terms.
    """
    q = q.float().reshape(-1, q.shape[-1])
    p_bar = _global_mean(q.mean(0))
    quant = (p_bar * torch.log(p_bar.clamp_min(1e-30))).sum()
    entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
    return {"loss": quant_weight * quant + entropy_weight * entropy, "quant": quant, "entropy": entropy}


@torch.no_grad()
def codebook_stats(q: torch.Tensor) -> dict[str, float]:
    """Logging metrics: codebook usage (unique argmax tokens / positions), sharpness (mean entropy, nats)."""
    q = q.float().reshape(-1, q.shape[-1])
    unique = torch.unique(q.argmax(-1)).numel()
    entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
    return {"codebook_usage": unique / q.shape[0], "codes_used": float(unique), "token_entropy": float(entropy),
            "max_entropy": math.log(q.shape[-1])}


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½·[mean relu(1 − D(x)) + mean relu(1 + D(x̂))]."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial term −mean D(x̂)."""
    return -logits_fake.float().mean()


class GanGate:
    """Turns the adversarial term on at step t iff max(EMA of D loss, last D loss) ≤ threshold (paper eq. 5).

    The first step always has the gate closed (last D loss = +inf). State is a plain dict for checkpoints.
    """

    def __init__(self, threshold: float = GAN_THRESHOLD, momentum: float = GAN_EMA_MOMENTUM,
                 ema_init: float = GAN_EMA_INIT) -> None:
        self.threshold, self.momentum = threshold, momentum
        self.ema = ema_init
        self.last = math.inf

    @property
    def open(self) -> bool:
        return max(self.ema, self.last) <= self.threshold

    def update(self, d_loss: float) -> None:
        """Feed the (rank-averaged) discriminator loss of the step that just finished."""
        self.last = float(d_loss)
        self.ema = self.momentum * self.ema + (1 - self.momentum) * self.last

    def state_dict(self) -> dict[str, float]:
        return {"ema": self.ema, "last": self.last, "threshold": self.threshold, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.ema, self.last = float(state["ema"]), float(state["last"])
        self.threshold, self.momentum = float(state["threshold"]), float(state["momentum"])


def random_mim_mask(batch: int, length: int, mask_ratio: float = MASK_RATIO, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask (batch, length), True = masked: per sample ⌊L(1 − ratio)⌋ visible tokens drawn uniformly.

    The floor is taken with a 1e-9 tolerance: the official ``int(L * (1 - 0.55))`` gives 44 for L = 100 because
    1 − 0.55 is 0.44999… in binary floating point (one visible token fewer than the stated ratio).
    """
    visible = math.floor(length * (1 - mask_ratio) + 1e-9)
    scores = torch.rand(batch, length, device=device, generator=generator)
    keep = scores.argsort(-1)[:, :visible]
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return mask


def mim_loss(logits: torch.Tensor, target_q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets, mean over masked tokens: −Σ_k q(k) log softmax(ŷ)_k (paper eq. 6)."""
    return F.cross_entropy(logits.float(), target_q.float())


@torch.no_grad()
def mim_kl(logits: torch.Tensor, target_q: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ prediction), logged only."""
    logp = logits.float().log_softmax(-1)
    q = target_q.float()
    return (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(-1).mean()
