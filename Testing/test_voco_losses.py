"""VoCo crops, position labels and losses: hand-computed values and equality with the official loop form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vocoslicer.ssl.voco import (
    VoCoGeometry,
    augment_crop,
    base_crop_origins,
    cut_crops,
    position_labels,
    prediction_loss,
    regularization_loss,
    sample_random_centres,
    voco_v2_loss,
)


# ------------------------------------------------------------------ loop references (official structure)
def _labels_loop(centres, n, r):
    out = np.zeros((len(centres), n * n))
    for a, (cx, cy) in enumerate(centres):
        for i in range(n):
            for j in range(n):
                dx = min((i + 1) * r, cx + r / 2) - max(i * r, cx - r / 2)
                dy = min((j + 1) * r, cy + r / 2) - max(j * r, cy - r / 2)
                if dx > 0 and dy > 0:
                    out[a, i * n + j] = dx * dy / (r * r)
    return out


def _ce_loop(y, s):
    pos = neg = 0.0
    ysum = nsum = 0.0
    for a in range(y.shape[0]):
        for k in range(y.shape[1]):
            pos = pos - y[a, k] * torch.log(1 - torch.abs(y[a, k] - s[a, k]) + 1e-6)
            ysum = ysum + y[a, k]
            if y[a, k] == 0:
                neg = neg - torch.log(1 - s[a, k] + 1e-6)
                nsum += 1
    return pos / (ysum + 1e-6) + neg / (nsum + 1e-6)


def _assign_loop(x, b):
    return torch.stack([torch.stack([F.relu(F.cosine_similarity(xi[None], bk[None])[0]) for bk in b]) for xi in x])


def _reg_loop(z):
    total, count = 0.0, 0
    for k in range(len(z)):
        for l in range(k + 1, len(z)):
            total = total + F.relu(F.cosine_similarity(z[k][None], z[l].detach()[None])[0]) ** 2
            count += 1
    return total / count


def _v2_loop(s_rand, s_base, t_rand, t_base, labels):
    bsz = s_rand.shape[0]
    intra = inter = reg = 0.0
    for i in range(bsz):
        j = (i + 1) % bsz
        intra = intra + _ce_loop(labels[i], _assign_loop(s_rand[i], t_base[i]))
        with torch.no_grad():
            tgt = _assign_loop(t_rand[i], t_base[j])
        inter = inter + _ce_loop(tgt, _assign_loop(s_rand[i], s_base[j]))
        reg = reg + _reg_loop(s_base[i])
    return (intra + inter + reg) / bsz


# ------------------------------------------------------------------ geometry and labels
def test_base_crop_order_is_i_major():
    o = base_crop_origins(3, 64)
    assert o.tolist()[:4] == [[0, 0], [0, 64], [0, 128], [64, 0]]
    assert VoCoGeometry().region == (192, 192, 64) and VoCoGeometry().n_base == 9


def test_labels_by_hand():
    lab = position_labels(np.array([[32, 32], [64, 32], [64, 64], [100, 150]]), 3, 64)
    assert lab[0].tolist() == [1.0] + [0.0] * 8
    # straddles bases (0,0) and (1,0) along axis 0: half each
    assert lab[1, 0] == 0.5 and lab[1, 3] == 0.5 and lab[1].sum() == 1.0 and np.count_nonzero(lab[1]) == 2
    assert [lab[2, k] for k in (0, 1, 3, 4)] == [0.25] * 4
    # centre (100,150): x box [68,132) -> 60 in base 1, 4 in base 2; y box [118,182) -> 10 in base 1, 54 in base 2
    assert lab[3, 1 * 3 + 1] == pytest.approx(60 * 10 / 4096) and lab[3, 2 * 3 + 2] == pytest.approx(4 * 54 / 4096)


def test_labels_match_loop_and_sum_to_one():
    rng = np.random.default_rng(0)
    for n, r in ((3, 64), (4, 96), (2, 16)):
        c = sample_random_centres(rng, 50, n, r)
        assert c.min() >= r // 2 and c.max() < n * r - r // 2
        lab = position_labels(c, n, r)
        np.testing.assert_allclose(lab, _labels_loop(c, n, r), atol=0)
        np.testing.assert_allclose(lab.sum(1), 1.0, atol=1e-12)
        assert (np.count_nonzero(lab, axis=1) <= 4).all()


def test_cut_crops_positions_and_shapes():
    n, r = 3, 8
    region = np.arange(n * r * n * r * r, dtype=np.float32).reshape(1, n * r, n * r, r)
    rand, base = cut_crops(region, np.array([[4, 4], [12, 20]]), n, r)
    assert rand.shape == (2, 1, r, r, r) and base.shape == (9, 1, r, r, r)
    np.testing.assert_array_equal(rand[0], base[0])  # centre (r/2, r/2) is exactly base 0
    np.testing.assert_array_equal(base[5], region[:, 8:16, 16:24, :])  # k = 5 -> i=1, j=2
    np.testing.assert_array_equal(rand[1], region[:, 8:16, 16:24, :])


def test_augment_keeps_shape_and_changes_some_crops():
    rng = np.random.default_rng(1)
    crop = np.random.default_rng(2).random((1, 8, 8, 8)).astype(np.float32)
    outs = [augment_crop(crop, rng) for _ in range(40)]
    assert all(o.shape == crop.shape and o.dtype == np.float32 for o in outs)
    changed = sum(not np.array_equal(o, crop) for o in outs)
    assert 10 < changed < 40  # ~1-(0.8^4*0.5) = 80 % change something
    assert all(np.isclose(np.sort(o.ravel() - o.mean()), np.sort(crop.ravel() - crop.mean()), atol=1e-6).all()
               for o in outs)  # only flips/rotations/shifts


# ------------------------------------------------------------------ losses
def test_prediction_loss_by_hand():
    y = torch.tensor([[[1.0, 0.0]]])
    s = torch.tensor([[[0.5, 0.2]]])
    expected = -math.log(0.5 + 1e-6) / (1 + 1e-6) - math.log(0.8 + 1e-6) / (1 + 1e-6)
    assert prediction_loss(y, s).item() == pytest.approx(expected, rel=1e-6)
    v1 = -math.log(0.5 + 1e-6) / (1 + 1e-6) + 0.04 / (1 + 1e-6)
    assert prediction_loss(y, s, version=1).item() == pytest.approx(v1, rel=1e-6)


def test_regularization_by_hand_and_gradient_direction():
    z = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]], requires_grad=True)
    loss = regularization_loss(z)
    assert loss.item() == pytest.approx(1 / 3, rel=1e-6)
    loss.sum().backward()
    ref = z.detach().clone().requires_grad_(True)
    _reg_loop(ref[0]).backward()
    torch.testing.assert_close(z.grad, ref.grad)
    assert z.grad[0, 2].abs().sum() == 0  # the last base is only ever the stop-gradient partner


@pytest.mark.parametrize("bsz", [1, 2, 3])
def test_v2_loss_equals_loop_reference_values_and_grads(bsz):
    torch.manual_seed(bsz)
    sw, nb, d = 2, 9, 16
    s_rand = torch.randn(bsz, sw, d, requires_grad=True)
    s_base = torch.randn(bsz, nb, d, requires_grad=True)
    t_rand, t_base = torch.randn(bsz, sw, d), torch.randn(bsz, nb, d)
    c = sample_random_centres(np.random.default_rng(bsz), bsz * sw, 3, 64)
    labels = torch.from_numpy(position_labels(c, 3, 64)).float().reshape(bsz, sw, nb)
    loss, parts = voco_v2_loss(s_rand, s_base, t_rand, t_base, labels)
    assert set(parts) == {"intra", "inter", "reg"}
    torch.testing.assert_close(loss, sum(parts.values()))
    g = torch.autograd.grad(loss, (s_rand, s_base))
    r_rand = s_rand.detach().clone().requires_grad_(True)
    r_base = s_base.detach().clone().requires_grad_(True)
    ref = _v2_loop(r_rand, r_base, t_rand, t_base, labels)
    gr = torch.autograd.grad(ref, (r_rand, r_base))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_inter_with_one_volume_uses_the_same_volume():
    torch.manual_seed(0)
    s_rand, s_base = torch.randn(1, 2, 8), torch.randn(1, 9, 8)
    labels = torch.full((1, 2, 9), 1 / 9)
    _, parts = voco_v2_loss(s_rand, s_base, s_rand, s_base, labels)
    assert parts["inter"].item() == pytest.approx(prediction_loss(
        torch.relu(F.cosine_similarity(s_rand[0, :, None], s_base[0, None], dim=-1))[None],
        torch.relu(F.cosine_similarity(s_rand[0, :, None], s_base[0, None], dim=-1))[None]).item(), rel=1e-5)
