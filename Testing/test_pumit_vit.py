"""PUMIT universal ViT: 3D RoPE properties and frequencies, SAC patch embedding, MIM forward, downstream adapters."""

from __future__ import annotations

import pytest
import torch

from vocoslicer.models.pumit.adapters import PumitViTClassifier, PumitViTSegmenter, load_backbone
from vocoslicer.models.pumit.mim import PumitMIM
from vocoslicer.models.pumit.rope import Rope3D, rope_frequencies, rotate_half
from vocoslicer.models.pumit.vit import PumitViT, adapt_vit_state_dict, param_groups, vit_config
from vocoslicer.ssl.pumit import random_mim_mask


def test_rope_frequencies_match_spec():
    nu, omega = rope_frequencies(64)
    assert len(nu) == len(omega) == 16
    assert omega[0] == 1.0 and nu[0] == pytest.approx(2333 ** (-1 / 32)) and nu[0] == pytest.approx(0.785, abs=1e-3)
    assert nu[3] == pytest.approx(0.183, abs=1e-3) and omega[3] == pytest.approx(0.178, abs=1e-3)
    assert nu[15] == pytest.approx(5.46e-4, rel=1e-2) and omega[15] == pytest.approx(1.78e-4, rel=1e-2)


def test_rotate_half_interleaved_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-2.0, 1.0, -4.0, 3.0]))


def _rotated(rope: Rope3D, vec: torch.Tensor, grid, pos) -> torch.Tensor:
    cos, sin = rope.tables(grid)
    idx = (pos[0] * grid[1] + pos[1]) * grid[2] + pos[2]
    return Rope3D.rotate(vec, cos[idx], sin[idx])


def test_rope_dot_product_depends_only_on_relative_3d_offset():
    torch.manual_seed(0)
    rope = Rope3D(16)
    grid = (6, 7, 8)
    q, k = torch.randn(16, dtype=torch.float64).float(), torch.randn(16).float()
    pairs = [((0, 1, 2), (2, 3, 1)), ((3, 2, 4), (5, 4, 3)), ((1, 4, 6), (3, 6, 5))]  # same offset (2, 2, -1)
    dots = [float(_rotated(rope, q, grid, a) @ _rotated(rope, k, grid, b)) for a, b in pairs]
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)
    other = float(_rotated(rope, q, grid, (0, 1, 2)) @ _rotated(rope, k, grid, (2, 2, 2)))  # another offset
    assert abs(other - dots[0]) > 1e-3
    # rotation preserves norms; d = 0 uses in-plane angles only (EVA-02 2D RoPE)
    v = _rotated(rope, q, grid, (4, 5, 6))
    assert float(v.norm()) == pytest.approx(float(q.norm()), rel=1e-5)
    ang = rope.angles(grid)
    nu, omega = rope_frequencies(16)
    assert torch.allclose(ang[1 * 8 + 3], torch.cat((1 * omega, 3 * omega)).float())  # (d, h, w) = (0, 1, 3)
    last = ang[-1]  # (5, 6, 7)
    assert torch.allclose(last, torch.cat((5 * nu + 6 * omega, 5 * nu + 7 * omega)).float(), atol=1e-5)


def test_vit_same_tokens_for_any_spacing_and_cls_first():
    vit = PumitViT(vit_config("tiny"))
    iso = vit(torch.randn(1, 3, 32, 32, 32), aniso_d=0)
    thick = vit(torch.randn(1, 3, 8, 32, 32), aniso_d=2)
    flat = vit(torch.randn(1, 3, 1, 32, 32), aniso_d=5)
    assert iso.shape == thick.shape == (1, 1 + 8, 32) and flat.shape == (1, 1 + 4, 32)
    keys = set(vit.state_dict())
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.q_proj.weight",
              "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.1.mlp.ffn_ln.weight", "blocks.1.mlp.w3.bias"):
        assert k in keys
    assert "blocks.0.attn.k_bias" not in keys and not any("rope" in k for k in keys)
    b = vit_config("B")
    assert int(b.embed_dim * b.mlp_ratio) == 2048 and int(1024 * vit_config("L").mlp_ratio) == 2730
    groups = param_groups(vit, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(vit.pos_embed) in no_decay and id(vit.blocks[0].attn.q_bias) in no_decay
    assert id(vit.blocks[0].attn.q_proj.weight) not in no_decay


def test_mim_forward_and_mae_style_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, 64)
    mask = random_mim_mask(2, 16, 0.55)
    for start in (0, 1):
        mim = PumitMIM(PumitViT(vit_config("tiny")), codebook_size=24, mask_layer_start=start)
        logits = mim(x, 0, mask)
        assert logits.shape == (int(mask.sum()), 24)
        logits.sum().backward()
        assert mim.mask_token.grad is not None and mim.vit.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError):
        mim(x, 0, random_mim_mask(2, 8))


def test_backbone_conversion_and_adapters():
    torch.manual_seed(0)
    pre = PumitViT(vit_config("tiny"))  # pre-trained: SAC 16^3 patch, 3 channels
    sd = pre.state_dict()
    seg = PumitViTSegmenter(3, in_channels=1, size="tiny", patch_depth=4, pos_embed_shape=(4, 4, 4),
                            decoder_channels=(8, 8, 16, 16), stem_channels=(4, 8))
    missing, unexpected = load_backbone(seg, sd)
    assert not missing and not unexpected
    w = seg.vit.patch_embed.proj.weight
    expect = sd["patch_embed.proj.weight"].reshape(32, 3, 4, 4, 16, 16).sum(3).sum(1, keepdim=True) / 1
    assert torch.allclose(w, expect, atol=1e-5)  # depth groups of 4 summed, RGB summed / C_new (= 1)
    x = torch.randn(1, 1, 16, 64, 64)
    outs = seg.forward_deep(x)
    assert outs[0].shape == (1, 3, 16, 64, 64) and outs[1].shape == (1, 3, 16, 32, 32)
    assert seg(x).shape == (1, 3, 16, 64, 64)
    cls = PumitViTClassifier(5, in_channels=3, size="tiny", patch_depth=16, pos_embed_shape=(2, 2, 2))
    load_backbone(cls, sd)
    assert cls(torch.randn(2, 3, 32, 32, 32)).shape == (2, 5)
    assert torch.allclose(cls.vit.pos_embed, adapt_vit_state_dict(sd, cls.vit)["pos_embed"])
    assert torch.equal(cls.vit.cls_token.detach(), sd["cls_token"])


def test_eva02_2d_checkpoint_initialises_the_3d_vit():
    """EVA-02 layout (4-D 14x14 patch kernel, (1, 1 + g², C) pos-embed, lm_head): converted per spec §7.2."""
    from vocoslicer.models.pumit.mim import PumitMIM

    torch.manual_seed(0)
    mim = PumitMIM(PumitViT(vit_config("tiny", pos_embed_shape=(2, 4, 4))), codebook_size=24)
    eva = {k: v.clone() for k, v in mim.vit.state_dict().items()}
    eva["patch_embed.proj.weight"] = torch.randn(32, 3, 14, 14)
    eva["pos_embed"] = torch.randn(1, 1 + 4 * 4, 32)
    eva["mask_token"] = torch.randn(1, 1, 32)
    eva["lm_head.weight"] = torch.randn(8192, 32)
    eva["rope.freqs_cos"] = torch.randn(16, 16)
    assert mim.load_pretrained(eva) == []
    w = mim.vit.patch_embed.proj.weight.detach()
    resized = torch.nn.functional.interpolate(eva["patch_embed.proj.weight"], size=(16, 16), mode="bicubic")
    assert w.shape == (32, 3, 16, 16, 16) and torch.allclose(w.sum(2), resized, atol=1e-5)
    pos = mim.vit.pos_embed.detach()
    assert torch.allclose(pos[:, :, 0], pos[:, :, 1])  # the 2D grid repeated over depth
    assert torch.allclose(pos[0, :, 0], eva["pos_embed"][0, 1:].T.reshape(32, 4, 4), atol=1e-5)
    assert torch.allclose(mim.vit.cls_token.detach(), eva["cls_token"] + eva["pos_embed"][:, :1])
    assert torch.equal(mim.mask_token.detach(), eva["mask_token"])
    # a 2D image through the SAC patch embedding (DA 5: depth taps summed) = the resized EVA kernel in 2D
    x = torch.randn(1, 3, 1, 32, 32)
    got = mim.vit.patch_embed(x, 5)[:, :, 0]
    ref = torch.nn.functional.conv2d(x[:, :, 0], resized, mim.vit.patch_embed.proj.bias, stride=16)
    assert torch.allclose(got, ref, atol=1e-4)


def test_official_tokenizer_keys_convert():
    from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig, convert_official_tokenizer

    tok = PumitTokenizer(TokenizerConfig(channels=(4, 8, 8), codebook_size=8, embed_dim=8, groups=2))
    official = {}
    for k, v in tok.state_dict().items():
        parts = k.split(".")
        if parts[0] == "encoder" and parts[1] in ("1", "4", "7"):  # official LayerNormNd wraps nn.LayerNorm as .1
            k = f"encoder.{parts[1]}.1.{parts[2]}"
        official[k] = v
    assert "encoder.1.1.weight" in official
    fresh = PumitTokenizer(TokenizerConfig(channels=(4, 8, 8), codebook_size=8, embed_dim=8, groups=2))
    fresh.load_state_dict(convert_official_tokenizer({"model": official, "step": torch.tensor(3)}))
    assert torch.equal(fresh.quantize.embedding.weight, tok.quantize.embedding.weight)
