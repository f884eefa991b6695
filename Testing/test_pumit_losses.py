"""PUMIT soft tokens, prior-distribution regulariser, GAN losses/gate, MIM mask and loss on hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch

from vocoslicer.models.pumit.perceptual import lpips_vgg16, random_feature_perceptual
from vocoslicer.ssl.pumit import (
    GanGate,
    codebook_stats,
    generator_adv_loss,
    hinge_d_loss,
    mim_kl,
    mim_loss,
    prior_regularizer,
    random_mim_mask,
    soft_tokens,
)


def test_soft_token_is_codebook_expectation():
    q_true = torch.tensor([0.5, 0.25, 0.25])
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    q, e = soft_tokens(q_true.log()[None], codebook)
    assert torch.allclose(q[0], q_true)
    assert torch.allclose(e[0], torch.tensor([0.5 + 0.5, 0.25 + 0.5]))


def test_prior_regularizer_hand_computed():
    one_hot = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # sharp but only 2 of 4 codes used
    r = prior_regularizer(one_hot, 0.03, 1.0)
    assert r["quant"].item() == pytest.approx(-math.log(2)) and r["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert r["loss"].item() == pytest.approx(-0.03 * math.log(2))
    uniform = torch.full((3, 4), 0.25)  # diverse on average but not sharp
    r = prior_regularizer(uniform, 0.03, 1.0)
    assert r["quant"].item() == pytest.approx(-math.log(4)) and r["entropy"].item() == pytest.approx(math.log(4))
    assert r["loss"].item() == pytest.approx(-0.03 * math.log(4) + math.log(4))
    perfect = torch.eye(4)  # sharp and diverse: the minimum
    assert prior_regularizer(perfect)["loss"] < prior_regularizer(one_hot)["loss"] < prior_regularizer(uniform)["loss"]


def test_codebook_stats():
    q = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    s = codebook_stats(q)
    assert s["codebook_usage"] == pytest.approx(2 / 4) and s["codes_used"] == 2
    assert s["max_entropy"] == pytest.approx(math.log(3))


def test_gan_losses_and_gate():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert generator_adv_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    gate = GanGate()
    assert not gate.open  # last D loss = +inf at the first step
    steps = 0
    while not gate.open:
        gate.update(0.0)
        steps += 1
    assert steps == 14  # 0.1 * 0.9^n <= 0.025 first at n = 14
    gate.update(0.5)  # one bad step closes it again (max of EMA and last)
    assert not gate.open
    clone = GanGate()
    clone.load_state_dict(gate.state_dict())
    assert clone.ema == gate.ema and clone.last == gate.last


def test_mim_mask_ratio():
    g = torch.Generator().manual_seed(0)
    m = random_mim_mask(4, 100, 0.55, generator=g)
    assert m.dtype == torch.bool and (m.sum(1) == 55).all()
    assert not torch.equal(m[0], m[1])
    m2 = random_mim_mask(2, 250, 0.55, generator=g)  # ⌊250·0.45⌋ = 112 visible
    assert (m2.sum(1) == 250 - 112).all()


def test_mim_loss_matches_manual_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    manual = -(q * logits.log_softmax(-1)).sum(-1).mean()
    assert mim_loss(logits, q).item() == pytest.approx(manual.item())
    assert mim_kl(q.log().clamp_min(-50), q).item() == pytest.approx(0.0, abs=1e-5)


def test_random_feature_perceptual_is_a_distance():
    loss = random_feature_perceptual(channels=(4, 8), max_slices=2)
    x = torch.rand(1, 3, 3, 16, 16) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    noisy = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = loss(x, noisy)  # training mode: 2 of the 3 slices
    d.backward()
    assert d.item() > 0 and noisy.grad is not None and not any(p.requires_grad for p in loss.parameters())
    again = random_feature_perceptual(channels=(4, 8), max_slices=2)  # seeded: same network every time
    assert all(torch.equal(a, b) for a, b in zip(loss.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_lpips_loader_reads_local_files(tmp_path):
    """The LPIPS path with user-provided files (here random tensors of the right shapes, real files on disk)."""
    from vocoslicer.models.pumit.perceptual import VGG16_CFG, _vgg_features

    feats = _vgg_features(VGG16_CFG)
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg16.pth")
    chans = (64, 128, 256, 512, 512)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chans)}, tmp_path / "lin.pth")
    loss = lpips_vgg16(tmp_path / "vgg16.pth", tmp_path / "lin.pth")
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6) and loss(x, -x).item() > 0
    from vocoslicer.errors import UserError

    with pytest.raises(UserError):
        lpips_vgg16(tmp_path / "lin.pth", tmp_path / "lin.pth")
