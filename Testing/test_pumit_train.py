"""PUMIT tokenizer and MIM training on phantoms (tiny models, CPU): losses drop, resume is exact, bundles work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.data.anisotropy import (
    DACropDataset,
    SameDABatchSampler,
    degree_of_anisotropy,
    find_inputs,
    load_volume_array,
    prepare_volumes,
)
from vocoslicer.data.phantom import generate_phantom, write_phantom
from vocoslicer.errors import Cancelled
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.models.factory import build_model
from vocoslicer.models.pumit import backbone_vit_args, load_backbone
from vocoslicer.models.pumit.tokenizer import PumitTokenizer, TokenizerConfig
from vocoslicer.train.loop import TrainConfig
from vocoslicer.train.pretrain_pumit import TokenizerRecipe, load_tokenizer, train_mim, train_tokenizer

TINY_TOK = TokenizerConfig(channels=(8, 16, 16), codebook_size=32, embed_dim=16, groups=4)
RECIPE = TokenizerRecipe(perceptual="random:4,8", d_channels=(8, 8, 8))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("pumit")
    write_phantom(generate_phantom(1, spacing=(1.5, 1.5, 1.5), size=(40, 40, 36)), root / "data")
    write_phantom(generate_phantom(2, spacing=(1.0, 1.0, 5.0), size=(40, 40, 16)), root / "data")
    return prepare_volumes(find_inputs([root / "data"]), root / "cache")


def _cfg(steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, weight_decay=0.05, amp="off", amsgrad=False, seed=3, log_every=1,
                       ckpt_every=100, **kw)


def _mean(history, key, sl):
    vals = [h[key] for h in history if h["split"] == "train"][sl]
    return sum(vals) / len(vals)


def test_inputs_are_depth_first_and_cached(items, tmp_path):
    assert [it.spacing for it in items] == [(1.5, 1.5, 1.5), (5.0, 1.0, 1.0)]
    assert [it.shape for it in items] == [(36, 40, 40), (16, 40, 40)]
    arr = np.load(items[1].array_path, mmap_mode="r")
    assert arr.dtype == np.float16 and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
    png = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)),
                    str(png))
    a, spacing = load_volume_array(png)
    assert a.shape == (1, 1, 40, 48) and degree_of_anisotropy(spacing) == 5
    ds = DACropDataset(prepare_volumes([png], tmp_path / "c"))
    sampler = SameDABatchSampler([(1, 40, 48)], [spacing], 2, 2, 2, zoom=False)
    req = next(iter(sampler))[0]
    sample = ds[req]
    assert sample["image"].shape == (3, 1, 32, 32) and sample["aniso_d"] == 5


def test_pumit_uses_the_shared_cache_limit_bad_volumes_and_streaming(tmp_path):
    """The cache policy of VoCo (one pipeline): LRU limit, then streaming; unreadable images skipped, remembered."""
    data = tmp_path / "data"
    write_phantom(generate_phantom(1, spacing=(1.5, 1.5, 1.5), size=(40, 40, 36)), data)
    write_phantom(generate_phantom(2, spacing=(1.0, 1.0, 5.0), size=(40, 40, 16)), data)
    (data / "broken.nii.gz").write_bytes(b"not an image" * 20)
    full = prepare_volumes([data], tmp_path / "cache")
    assert [Path(it.source).name for it in full] == ["phantom_1_ct.nii.gz", "phantom_2_ct.nii.gz"]
    sizes = [np.load(it.array_path, mmap_mode="r").nbytes for it in full]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["entries"]) == 2 and list(index["bad"].values())[0].startswith("cannot read image")
    small = prepare_volumes([data], tmp_path / "small", limit_bytes=sizes[0] + 10)
    assert [it.array_path is None for it in small] == [False, True]  # the first fits, the second is streamed
    ds = DACropDataset(small, augment=False)
    sampler = SameDABatchSampler([it.shape for it in small], [it.spacing for it in small], 1, 1, 2, zoom=False)
    req = next(r for batch in sampler for r in batch if r.index == 1)
    assert ds[req]["image"].shape == (3, *req.shape)


def test_tokenizer_steps_reduce_loss(items, tmp_path):
    r = train_tokenizer(items, tmp_path / "tok", TINY_TOK, _cfg(8, 3e-3), RECIPE, batch_size=2, tokens_z=1,
                        tokens_xy=2)
    h = r["history"]
    assert _mean(h, "loss", slice(-3, None)) < _mean(h, "loss", slice(0, 3))
    assert _mean(h, "rec", slice(-3, None)) < _mean(h, "rec", slice(0, 3))
    assert all(0 < x["codebook_usage"] <= 1 and x["gan_on"] == 0.0 for x in h)  # gate closed this early
    tok = load_tokenizer(tmp_path / "tok")  # via the exported bundle
    assert isinstance(tok, PumitTokenizer) and tok.cfg.codebook_size == 32


def test_tokenizer_resume_is_exact(items, tmp_path):
    straight = train_tokenizer(items, tmp_path / "a", TINY_TOK, _cfg(5, 3e-3), RECIPE, 2, 2, 2)
    calls = []

    def stop_after_3() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Cancelled):
        train_tokenizer(items, tmp_path / "b", TINY_TOK, _cfg(5, 3e-3), RECIPE, 2, 2, 2, should_stop=stop_after_3)
    resumed = train_tokenizer(items, tmp_path / "b", TINY_TOK, _cfg(5, 3e-3), RECIPE, 2, 2, 2, resume=True)
    assert resumed["step"] == 5
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k
    for k, v in a["extra"]["discriminator"]["model"].items():
        assert torch.allclose(v, b["extra"]["discriminator"]["model"][k], atol=1e-6), k
    assert a["extra"]["discriminator"]["gate"] == pytest.approx(b["extra"]["discriminator"]["gate"])
    assert [x["loss"] for x in straight["history"]] == pytest.approx([x["loss"] for x in resumed["history"]])


def test_mim_reduces_loss_and_exports_usable_backbone(items, tmp_path):
    torch.manual_seed(0)
    tok = PumitTokenizer(TINY_TOK)
    r = train_mim(items, tmp_path / "mim", tok, _cfg(16, 2e-3, grad_clip=0.5), size="tiny", batch_size=2,
                  tokens_z=2, tokens_xy=2)
    h = r["history"]
    assert _mean(h, "loss", slice(-4, None)) < _mean(h, "loss", slice(0, 4))
    assert all(x["masked"] == pytest.approx(0.625) for x in h)  # L = 8: ⌊8·0.45⌋ = 3 visible
    bundle = ModelBundle.load(r["bundle"])
    assert bundle.task == "backbone" and bundle.architecture[0] == "pumit_vit"
    vit = bundle.build_model()
    assert vit(torch.rand(1, 3, 8, 32, 32), aniso_d=2).shape == (1, 9, 32)
    sd = bundle.state_dict()
    cls = build_model("pumit_vit_cls", {"out_channels": 4, "size": "B", "patch_depth": 16, "pos_embed_shape": [2, 2, 2],
                                        "vit_args": backbone_vit_args(bundle.architecture[1])})
    assert cls.vit.embed_dim == 32 and len(cls.vit.blocks) == 2  # the backbone's width/depth, not ViT-B's
    assert load_backbone(cls, sd) == ([], [])
    assert cls(torch.rand(2, 3, 32, 32, 32)).shape == (2, 4)
    seg = build_model("pumit_vit_seg", {"out_channels": 3, "in_channels": 1, "size": "tiny", "patch_depth": 4,
                                        "pos_embed_shape": [4, 4, 4], "decoder_channels": [8, 8, 16, 16],
                                        "stem_channels": [4, 8]})
    assert load_backbone(seg, sd) == ([], [])
    assert seg(torch.rand(1, 1, 16, 64, 64)).shape == (1, 3, 16, 64, 64)


def test_cli_tokenizer_then_mim(tmp_path, items):
    from vocoslicer.cli import main

    data = str(tmp_path / "d")
    write_phantom(generate_phantom(4, spacing=(1.0, 1.0, 3.0), size=(40, 40, 16)), data)
    common = ["--data", data, "--steps", "2", "--batch", "2", "--crop", "32,32", "--workers", "0",
              "--cache", str(tmp_path / "c"), "--log-every", "1"]
    assert main(["pretrain", "tokenizer", *common, "--out", str(tmp_path / "tok"), "--size", "tiny",
                 "--perceptual", "random:4,8"]) == 0
    assert (tmp_path / "tok" / "tokenizer" / "model.json").is_file()
    assert main(["pretrain", "mim", "--tokenizer", str(tmp_path / "tok"), *common, "--out", str(tmp_path / "mim"),
                 "--size", "tiny"]) == 0
    assert (tmp_path / "mim" / "backbone" / "model.json").is_file()
    assert main(["pretrain", "mim", "--tokenizer", str(tmp_path / "tok" / "tokenizer"), *common, "--out",
                 str(tmp_path / "mim2"), "--size", "tiny", "--init", str(tmp_path / "mim" / "backbone")]) == 0
    assert main(["pretrain", "mim", "--tokenizer", str(tmp_path / "tok"), *common, "--out", str(tmp_path / "z"),
                 "--size", "tiny", "--init", str(tmp_path / "tok" / "tokenizer_config.json")]) == 2
    assert main(["pretrain", "mim", "--tokenizer", str(tmp_path / "nope"), *common, "--out", str(tmp_path / "x")]) == 2
    assert main(["pretrain", "tokenizer", *common, "--out", str(tmp_path / "y"), "--crop", "30,32"]) == 2
    from vocoslicer.commands.pretrain.tokenizer import parse_crop

    assert parse_crop("96", 16) == (6, 6) and parse_crop("80,160", 16) == (5, 10)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_on_cpu(items, tmp_path, amp):
    """The GPU code paths (autocast, fp16 GradScaler for G and D) run on CPU and keep every loss finite."""
    cfg = TrainConfig(steps=2, lr=1e-3, amp=amp, amsgrad=False, log_every=1, ckpt_every=100)
    thick = items[1:]  # 5 mm slices: DA 2, 4-slice crops (bf16 3D convs are slow on CPU)
    r = train_tokenizer(thick, tmp_path / "tok", TINY_TOK, cfg, RECIPE, batch_size=1, tokens_z=1, tokens_xy=2)
    assert all(np.isfinite([h["loss"], h["d_loss"], h["perceptual"]]).all() for h in r["history"])
    m = train_mim(thick, tmp_path / "mim", PumitTokenizer(TINY_TOK), cfg, size="tiny", batch_size=1, tokens_z=1,
                  tokens_xy=2)
    assert all(np.isfinite(h["loss"]) for h in m["history"])
