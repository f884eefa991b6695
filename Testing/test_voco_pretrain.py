"""VoCo pretraining end to end on CPU: learning on phantoms, kill + resume, DDP under torchrun, export, init, CLI.

Training tests use a tiny CNN in place of the Swin encoder (``VoCoHead(backbone=...)``): Swin's 7³ attention
windows make even a 32×32×64 crop cost seconds per step on this CPU. The Swin encoder itself is covered by the
key/export/init tests (no forward needed) and one slow-marked training step.
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources
from vocoslicer.data.phantom import generate_phantom, write_phantom
from vocoslicer.data.ssl_dataset import VoCoCropDataset, voco_step
from vocoslicer.models.voco_head import VoCoHead
from vocoslicer.train.loop import TrainConfig
from vocoslicer.train.pretrain_voco import VoCoRecipe, build_model, export_backbone, pretrain_voco
from vocoslicer.train.state import load_checkpoint


class TinyEncoder(nn.Module):
    """Stands in for the Swin encoder in CPU training tests: crops → (N, 32) embeddings."""

    embed_dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv3d(8, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                 nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_data(root: Path) -> Path:
    data = root / "data"
    if not data.exists():
        for seed in range(2):
            write_phantom(generate_phantom(seed, spacing=(6, 6, 6), size=(48, 48, 32)), data)
    return data


def tiny_recipe(cache: Path) -> VoCoRecipe:
    return VoCoRecipe(roi=16, grid=2, sw=2, depth=16, batch=2, hidden_dim=64, out_dim=64, workers=0,
                      cache_dir=str(cache), preprocess=PreprocessConfig(spacing=(6.0, 6.0, 6.0)))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("voco"))


def _hash(model: nn.Module) -> str:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def test_twenty_steps_on_phantoms_reduce_the_loss(phantoms, tmp_path):
    rec = tiny_recipe(tmp_path / "cache")
    cache = VolumeCache(rec.cache_dir, rec.preprocess)
    entries, _ = cache.prepare(find_sources([phantoms]))
    ds = VoCoCropDataset(cache, entries, rec.geometry)
    torch.manual_seed(123)
    batches = [default_collate([ds[0], ds[1]]) for _ in range(8)]

    def fixed_loss(model: nn.Module) -> float:  # same crops; no embedding dropout (its whole-row drops add noise)
        model = copy.deepcopy(model)
        model.embed_dropout = 0.0
        with torch.no_grad():
            return sum(voco_step(model, b)[0].item() for b in batches) / len(batches)

    losses = {}
    for lr in (0.0, 5e-4):  # lr 0: the teacher EMA alone, as control
        res = pretrain_voco([str(phantoms)], tmp_path / f"run{lr}", rec,
                            TrainConfig(steps=20, lr=lr, log_every=5, device="cpu"), backbone=TinyEncoder())
        assert res["step"] == 20 and res["stopped"] == "done"
        assert {"intra", "inter", "reg", "loss"} <= set(res["history"][-1])
        losses[lr] = fixed_loss(res["model"])
    torch.manual_seed(0)
    initial = fixed_loss(build_model(rec, TinyEncoder()))
    assert losses[5e-4] < losses[0.0] - 0.02 and losses[5e-4] < initial


def test_kill_then_resume_continues_step_and_optimizer(phantoms, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, "kill", str(phantoms), str(tmp_path)], env=env)
    ck_path = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ck_path.exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)  # no chance to save: only the periodic checkpoints survive
    proc.wait(timeout=30)
    saved = load_checkpoint(ck_path)
    s = saved["step"]
    assert s >= 2 and s % 2 == 0
    res = pretrain_voco([str(phantoms)], tmp_path / "run", tiny_recipe(tmp_path / "cache"),
                        TrainConfig(steps=s + 2, lr=1e-3, ckpt_every=2, log_every=1, device="cpu"), resume=True,
                        backbone=TinyEncoder())
    assert res["step"] == s + 2
    assert [h["step"] for h in res["history"]] == list(range(1, s + 3))  # history kept from before the kill
    final = load_checkpoint(ck_path)
    for k, st in final["optimizer"]["state"].items():
        assert int(st["step"]) == s + 2  # a fresh optimizer would say 2
        assert (st["max_exp_avg_sq"] >= saved["optimizer"]["state"][k]["max_exp_avg_sq"]).all()
    assert final["scheduler"]["last_epoch"] == s + 2


def test_ddp_two_gloo_ranks_identical_weights(phantoms, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "ddp",
           str(phantoms), str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    h0, h1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert h0 == h1 and h0[0] == "3"
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["world_size"] == 2


def test_official_key_names_and_sizes():
    sd = VoCoHead("B").state_dict()
    assert len(sd) == 157 and sum(v.numel() for v in sd.values()) == 60665082  # reference/voco_B_ssl_keys.txt
    assert tuple(sd["backbone.swinViT.patch_embed.proj.weight"].shape) == (48, 1, 2, 2, 2)
    assert tuple(sd["student.layer1.0.weight"].shape) == (1024, 1152)
    assert tuple(sd["teacher.layer3.0.weight"].shape) == (1024, 1024)
    assert sum(k.startswith("backbone.") for k in sd) == 145


def test_exported_backbone_loads_into_swinunetr(tmp_path):
    from vocoslicer.models.bundle import ModelBundle
    from vocoslicer.models.checkpoints import load_official_weights
    from vocoslicer.models.swin import build_swinunetr

    torch.manual_seed(0)
    model = VoCoHead(feature_size=12)
    out = export_backbone(model, tmp_path / "run", VoCoRecipe(size=None, feature_size=12), step=5)
    bundle = ModelBundle.load(out)
    assert bundle.task == "backbone" and bundle.architecture == ("swinunetr", {
        "feature_size": 12, "in_channels": 1, "patch_merging": "legacy"})
    sd = bundle.state_dict()
    net = build_swinunetr(feature_size=12)
    report = load_official_weights(net, sd)
    assert report.missing_backbone == [] and len(report.loaded) == len(sd) == 145 and not report.unexpected
    assert all(k.startswith(("decoder", "out.")) for k in report.missing)
    torch.testing.assert_close(net.state_dict()["encoder10.layer.conv1.conv.weight"],
                               model.state_dict()["backbone.encoder10.layer.conv1.conv.weight"])


def test_init_from_official_checkpoint_formats(tmp_path):
    torch.manual_seed(1)
    src = VoCoHead(feature_size=12, hidden_dim=32, out_dim=32)
    ssl_head = tmp_path / "VoCo_SSL_head.pt"  # released format: bare encoder keys, no heads
    torch.save(src.backbone_state_dict(), ssl_head)
    training = tmp_path / "model_step20000.pt"  # official v2 training checkpoint: DDP prefixes under state_dict
    torch.save({"global_step": 20000, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               training)
    torch.manual_seed(2)
    dst = VoCoHead(feature_size=12, hidden_dim=32, out_dim=32)
    rep = dst.load_pretrained(ssl_head)
    assert rep["loaded"] == 145 and rep["heads_loaded"] == 0 and not rep["missing"]
    assert not torch.equal(dst.student.layer1[0].weight, src.student.layer1[0].weight)
    rep = dst.load_pretrained(training)
    assert rep["loaded"] == 145 and rep["heads_loaded"] == 12
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_cli_print_torchrun(monkeypatch, capsys):
    from vocoslicer.cli import main

    argv = ["pretrain", "voco", "--data", "/d", "--out", "/r", "--gpus", "8", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--print-torchrun", "--steps", "5"]
    monkeypatch.setattr(sys, "argv", ["vocoslicer", *argv])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1" in out
    assert "-m vocoslicer pretrain voco --data /d --out /r --steps 5" in out and "--gpus" not in out


def test_cli_zero_steps_exports_and_export_only(phantoms, tmp_path, monkeypatch):
    from vocoslicer.cli import main
    from vocoslicer.models.bundle import ModelBundle

    argv = ["pretrain", "voco", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--steps", "0",
            "--feature-size", "12", "--crop", "32", "--depth", "64", "--grid", "2", "--sw", "1", "--batch", "1",
            "--workers", "0", "--spacing", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["vocoslicer", *argv])
    assert main(argv) == 0
    first = ModelBundle.load(tmp_path / "run" / "backbone").meta["weights"]["sha256"]
    assert main(["pretrain", "voco", "--out", str(tmp_path / "run"), "--export-only"]) == 0
    assert ModelBundle.load(tmp_path / "run" / "backbone").meta["weights"]["sha256"] == first
    assert main(["pretrain", "voco", "--out", str(tmp_path / "nothing"), "--export-only"]) == 2


@pytest.mark.slow
def test_swin_encoder_training_step_on_cpu(phantoms, tmp_path):
    rec = VoCoRecipe(size=None, feature_size=12, roi=32, grid=1, sw=1, depth=64, batch=1, hidden_dim=32,
                     out_dim=32, workers=0, cache_dir=str(tmp_path / "cache"),
                     preprocess=PreprocessConfig(spacing=(6.0, 6.0, 6.0)))
    res = pretrain_voco([str(phantoms)], tmp_path / "run", rec, TrainConfig(steps=1, device="cpu"))
    assert res["step"] == 1 and torch.isfinite(torch.tensor(res["history"][-1]["loss"]))
    assert Path(res["bundle"], "weights.safetensors").is_file()


def _child() -> int:
    mode, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rec = tiny_recipe(out / "cache")
    if mode == "kill":
        pretrain_voco([data], out / "run", rec, TrainConfig(steps=10_000, lr=1e-3, ckpt_every=2, log_every=1,
                                                            device="cpu"), backbone=TinyEncoder())
        return 0
    res = pretrain_voco([data], out / "run", rec, TrainConfig(steps=3, lr=1e-3, ckpt_every=2, device="cpu"),
                        backbone=TinyEncoder())
    (out / f"rank{os.environ['RANK']}.txt").write_text(f"{res['step']} {_hash(res['model'])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child())
