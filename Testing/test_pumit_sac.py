"""PUMIT SAC rules and degree of anisotropy, against the worked examples of pumit_spec.md §1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocoslicer.data.anisotropy import (
    SameDABatchSampler,
    crop_shape,
    degree_of_anisotropy,
    depth_first,
    token_grid,
)
from vocoslicer.models.pumit.sac import (
    SacConv3d,
    SacTransposedConv3d,
    adapt_in_channels,
    adapt_out_channels,
    depth_stride,
    inflate_2d_kernel,
    reduce_depth_taps,
    resample,
)
from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig

# spec §1.5: spacing (z, y, x), zoom (σz, σx) -> DA, tokenizer crop, MIM crop, ViT patch-embed depth kernel
SPEC_ROWS = [
    ((1.0, 1.0, 1.0), (1, 1), 0, (64, 128, 128), (80, 160, 160), 16),
    ((1.5, 0.7, 0.7), (1, 1), 1, (32, 128, 128), (40, 160, 160), 8),
    ((3.0, 0.75, 0.75), (1, 1), 2, (16, 128, 128), (20, 160, 160), 4),
    ((5.0, 0.8, 0.8), (1, 1), 2, (16, 128, 128), (20, 160, 160), 4),
    ((5.0, 0.8, 0.8), (1, 2.0), 1, (32, 128, 128), (40, 160, 160), 8),
    ((12.0, 0.7, 0.7), (1, 1), 4, (4, 128, 128), (5, 160, 160), 1),
    ((1e8, 1.0, 1.0), (1, 1), 5, (1, 128, 128), (1, 160, 160), 1),
]


@pytest.mark.parametrize(("spacing", "zoom", "da", "tok_crop", "mim_crop", "kd"), SPEC_ROWS)
def test_spec_worked_examples(spacing, zoom, da, tok_crop, mim_crop, kd):
    assert degree_of_anisotropy(spacing, zoom[0], zoom[1]) == da
    assert crop_shape(da, 4, 8) == tok_crop
    assert crop_shape(da, 5, 10) == mim_crop
    assert token_grid(tok_crop, da) == ((1 if da == 5 else 4), 8, 8)
    assert token_grid(mim_crop, da) == ((1 if da == 5 else 5), 10, 10)
    patch = SacConv3d(3, 4, 16, 16)
    w, stride, pad = patch.adapted(da, 0)
    assert w.shape[2] == kd and stride == (kd, 16, 16) and pad == (0, 0, 0)
    out, nd = patch(torch.zeros(1, 3, *mim_crop), da, 0)
    assert tuple(out.shape[2:]) == token_grid(mim_crop, da) and nd == 4


def test_depth_stride_table():
    table = {0: (2, 4, 16), 1: (1, 2, 8), 2: (1, 1, 4), 3: (1, 1, 2), 4: (1, 1, 1), 5: (1, 1, 1)}
    for da, row in table.items():
        assert tuple(depth_stride(s, da, 0) for s in (2, 4, 16)) == row


def test_floor_not_round_and_clip():
    assert degree_of_anisotropy((5.0, 0.8, 0.8)) == 2  # r = 6.25 -> floor(log2) = 2, round would give 3
    assert degree_of_anisotropy((0.5, 1.0, 1.0)) == 0  # r clipped up to 1
    assert degree_of_anisotropy((1e8, 1.0, 1.0), stride=None) > 5  # validation path: no upper clip
    with pytest.raises(ValueError):
        degree_of_anisotropy((0.0, 1.0, 1.0))


def test_tokenizer_5mm_slices_walkthrough():
    """(5.0, 0.8, 0.8): first k=s=4 conv keeps depth, the next convs are full 3D; decoder restores (16, H, W)."""
    tok = PumitTokenizer(TokenizerConfig(channels=(4, 8, 8), codebook_size=8, embed_dim=8, groups=2))
    enc = tok.encoder
    w, stride, _ = enc[0].adapted(2, 0)
    assert w.shape[2] == 1 and stride == (1, 4, 4)
    assert torch.allclose(w[:, :, 0], enc[0].weight.sum(2))  # sum of the 4 depth taps
    assert enc[3].adapted(2, 2)[1] == (2, 2, 2) and enc[9].adapted(2, 4)[0].shape[2] == 3  # full 3D after
    x = torch.randn(1, 3, 16, 32, 32)
    h, nd = enc[0](x, 2, 0)
    assert tuple(h.shape[2:]) == (16, 8, 8) and nd == 2
    out = tok(x, 2)
    assert tuple(out["q"].shape[1:4]) == (4, 2, 2) and out["nd"] == 4
    assert tuple(out["x_rec"].shape) == tuple(x.shape)
    dec = tok.decoder  # remained_d_up = 2, 1, 0 -> strides 2, 2, then 1 for the final k=s=4
    assert dec[6].transposed_conv.depth_stride(2, 4) == 2 and dec[7].transposed_conv.depth_stride(2, 3) == 2
    assert dec[8].depth_stride(2, 2) == 1


def test_2d_image_is_one_slice():
    tok = PumitTokenizer(TokenizerConfig(channels=(4, 8, 8), codebook_size=8, embed_dim=8, groups=2))
    x = torch.randn(2, 3, 1, 32, 32)
    out = tok(x, 5)
    assert tuple(out["q"].shape[1:4]) == (1, 2, 2) and tuple(out["x_rec"].shape) == tuple(x.shape)
    nd = 0
    for m in tok.encoder:  # every conv collapses to 1 x k x k (DA 5 > total down-sampling 4)
        if isinstance(m, SacConv3d):
            assert m.adapted(5, nd)[0].shape[2] == 1
            nd += m.m
    assert nd == 4


def test_sum_pooling_keeps_response_of_depth_constant_volume():
    conv = SacConv3d(2, 3, 4, 4)
    x1 = torch.randn(1, 2, 1, 8, 8)
    full, _ = conv(x1.repeat(1, 1, 4, 1, 1), 0, 0)  # full 4x4x4 kernel on a volume constant along depth
    reduced, _ = conv(x1, 2, 0)  # DA 2: depth taps summed, depth stride 1
    assert torch.allclose(full, reduced, atol=1e-5)
    k3 = SacConv3d(2, 3, 3, 1, 1)
    y_full, _ = k3(x1.repeat(1, 1, 5, 1, 1), 0, 0)
    y_red, _ = k3(x1, 1, 0)  # 1x3x3, depth pad 0
    assert y_red.shape[2] == 1 and torch.allclose(y_full[:, :, 2:3], y_red, atol=1e-5)


def test_group_sum_and_helpers():
    w = torch.randn(2, 3, 16, 4, 4)
    r = reduce_depth_taps(w, 4)
    assert torch.allclose(r[:, :, 1], w[:, :, 4:8].sum(2))
    w2 = torch.randn(5, 3, 4, 4)
    assert torch.allclose(reduce_depth_taps(inflate_2d_kernel(w2, 4), 1)[:, :, 0], w2, atol=1e-6)
    c = inflate_2d_kernel(w2, 2, "center")
    assert torch.allclose(c.sum(2), w2)
    a = adapt_in_channels(w, 1)
    assert a.shape[1] == 1 and torch.allclose(a[:, 0], w.sum(1))
    wo, bo = adapt_out_channels(torch.ones(3, 2, 1, 1, 1), torch.tensor([1.0, 2.0, 3.0]), 1)
    assert wo.shape[0] == 1 and torch.allclose(bo, torch.tensor([0.299 + 2 * 0.587 + 3 * 0.114]))
    assert resample(torch.ones(1, 2, 4, 4, 4), (2, 8, 4)).shape == (1, 2, 2, 8, 4)


def test_transposed_conv_depth_rules():
    up = SacTransposedConv3d(4, 2, 4)
    x = torch.randn(1, 4, 3, 2, 2)
    assert up(x, 0, 2)[0].shape[2:] == (12, 8, 8)  # remained 2 -> full
    assert up(x, 1, 2)[0].shape[2:] == (6, 8, 8)  # remained 1 -> stride 2, taps summed in pairs
    y, nd = up(x, 2, 2)
    assert y.shape[2:] == (3, 8, 8) and nd == 0


def test_depth_first_moves_thick_axis():
    arr = np.zeros((1, 40, 30, 5))
    out, sp = depth_first(arr, (0.8, 0.8, 5.0))
    assert out.shape == (1, 5, 40, 30) and sp == (5.0, 0.8, 0.8)
    same, sp2 = depth_first(arr, (1.0, 1.0, 1.0))
    assert same.shape == arr.shape and sp2 == (1.0, 1.0, 1.0)


def test_same_da_batches_and_rank_split():
    shapes = [(64, 256, 256), (12, 256, 256), (1, 256, 256)]
    spacings = [(1.0, 1.0, 1.0), (5.0, 0.8, 0.8), (1e8, 1.0, 1.0)]
    s = SameDABatchSampler(shapes, spacings, batch_size=3, tokens_z=4, tokens_xy=8, seed=1)
    it = iter(s)
    batches = [next(it) for _ in range(12)]
    for b in batches:
        assert len(b) == 3 and len({r.da for r in b}) == 1 and len({r.shape for r in b}) == 1
    assert {b[0].da for b in batches} >= {0, 5}
    r0 = SameDABatchSampler(shapes, spacings, 3, 4, 8, seed=1, rank=0, world_size=2)
    r1 = SameDABatchSampler(shapes, spacings, 3, 4, 8, seed=1, rank=1, world_size=2)
    i0, i1 = iter(r0), iter(r1)
    assert [next(i0) for _ in range(3)] == batches[0:6:2] and [next(i1) for _ in range(3)] == batches[1:6:2]
    resumed = SameDABatchSampler(shapes, spacings, 3, 4, 8, seed=1)
    resumed.start_batch = 5
    assert next(iter(resumed)) == batches[5]
