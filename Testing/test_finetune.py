"""Finetuning on a cohort of phantoms: bad input errors, cancel + resume, Dice gain, the new bundle segments.

The training test is marked slow: a SwinUNETR (feature size 12) step on a 64³ crop takes 10-30 s on the shared
2-core CI CPU, and 64³ is the smallest crop SwinUNETR can train on (its bottleneck instance norm needs > 1 voxel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.errors import Cancelled, UserError
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model
from vocoslicer.train.finetune import FinetuneOptions, run_finetune

PRE = {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "pad_value": -1024,
       "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
ARGS = {"size": None, "feature_size": 12, "in_channels": 1, "out_channels": 9, "patch_merging": "legacy"}


def start_bundle(path: Path) -> Path:
    """A random tiny SwinUNETR (validation Dice near 0: noise)."""
    torch.manual_seed(0)
    model = build_model("swinunetr", ARGS)
    meta = new_bundle_meta("tiny-phantom", "1.0.0", "segmentation", "swinunetr", ARGS, preprocessing=PRE,
                           inference={"roi_size": [64, 64, 64], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 2}, channel_values=[0, *PHANTOM_LABELS.values])
    return ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(path, model.state_dict())


def summary_history(run: Path) -> list[dict]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["history"]


def phantom_cohort(root: Path, labelled: int, unlabelled: int) -> Cohort:
    c = Cohort.init(root)
    for s in range(labelled + unlabelled):
        ph = generate_phantom(s, spacing=(8, 8, 8))
        if s < labelled:
            c.add(ph.image, ph.label, PHANTOM_LABELS, split="val" if s == labelled - 1 else "train")
        else:
            c.add(ph.image)
    return c


def test_bad_cohorts_are_one_line_errors(tmp_path: Path, home: Path) -> None:
    bundle = start_bundle(tmp_path / "start")
    empty = Cohort.init(tmp_path / "empty")
    with pytest.raises(UserError, match="the cohort is empty"):
        run_finetune(FinetuneOptions(empty.root, str(bundle), tmp_path / "r1"))
    only_u = phantom_cohort(tmp_path / "unl", 0, 1)
    with pytest.raises(UserError, match="only unlabelled cases"):
        run_finetune(FinetuneOptions(only_u.root, str(bundle), tmp_path / "r2"))
    other = Cohort.init(tmp_path / "other")
    ph = generate_phantom(0, spacing=(8, 8, 8))
    other.add(ph.image, ph.label, LabelTable(tuple(Label(lb.value, "kidney" if lb.value == 1 else lb.name)
                                                   for lb in PHANTOM_LABELS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "finetune", "--cohort", str(other.root), "--init",
                        str(bundle), "--out", str(tmp_path / "r3")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # the error is the last line; a warning about the cohort (no validation case) may come first, one line too
    lines = r.stderr.splitlines()
    assert lines[-1].startswith("vocoslicer: error: ") and all(ln.startswith("vocoslicer: ") for ln in lines)
    assert "cohort label 1 is 'kidney' but tiny-phantom v1.0.0" in lines[-1]
    with pytest.raises(UserError, match="--confidence"):
        run_finetune(FinetuneOptions(other.root, str(bundle), tmp_path / "r4", confidence=0.0))


@pytest.mark.slow
def test_finetune_cancel_resume_gain_and_segment(tmp_path: Path, home: Path) -> None:
    bundle = start_bundle(tmp_path / "start")
    cohort = phantom_cohort(tmp_path / "cohort", labelled=3, unlabelled=1)
    out = tmp_path / "run"
    opts = dict(cohort=cohort.root, init=str(bundle), out=out, steps=8, lr=1e-2, batch=1, semi_start=0.25,
                confidence=0.5, eval_every=4, device="cpu", amp="off", seed=0)
    polls = []

    def stop_after_two() -> bool:
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(Cancelled):
        run_finetune(FinetuneOptions(**opts), should_stop=stop_after_two)
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and ck["extra"]["teacher"]["started_at"] == 2  # the teacher is in the checkpoint
    with pytest.raises(UserError, match="--resume"):
        run_finetune(FinetuneOptions(**opts))
    summary = run_finetune(FinetuneOptions(**opts, resume=True))
    assert summary["steps"] == 8 and summary["start_val_dice"] < 0.05
    # 8 CPU steps from random weights lower the supervised loss; they do not reliably raise validation Dice above
    # the noise of a random start (measured: 0.017 -> 0.011/0.0075), so the Dice gain is the benchmark's job
    train = [h for h in summary_history(out) if h["split"] == "train"]
    assert train[-1]["sup"] < train[0]["sup"]
    assert summary["best_val_dice"] == max(h["val_dice"] for h in summary_history(out) if h["split"] == "val")
    new = ModelBundle.load(summary["installed"])
    assert (new.id, new.version) == ("tiny-phantom", "1.0.1")  # a new version above its parent
    assert new.meta["parent"]["id"] == "tiny-phantom" and len(new.meta["parent"]["sha256"]) == 64
    assert new.meta["training"]["cohort_version"] == cohort.version
    assert new.meta["training"]["semi_start_step"] == 2 and new.meta["training"]["n_unlabelled"] == 1
    assert new.meta["metrics"]["val_dice"] == pytest.approx(summary["best_val_dice"], abs=1e-4)
    # the new version is found by id at once, by the real CLI
    ph = generate_phantom(7, spacing=(8, 8, 8))
    img = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ph.image, str(img))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VOCOSLICER_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "segment", str(img), "-o", str(tmp_path / "seg.nii.gz"),
                        "--model", f"{new.id}@{new.version}", "--device", "cpu"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == ph.image.GetSize()
    assert json.loads((out / "summary.json").read_text())["id"] == "tiny-phantom"


def test_init_from_backbone_bundle_and_checkpoint(tmp_path: Path, home: Path) -> None:
    from vocoslicer.train.finetune import resolve_init

    torch.manual_seed(1)
    enc = build_model("swinunetr", {"feature_size": 12, "in_channels": 1, "out_channels": 2})
    sd = {k: v for k, v in enc.state_dict().items() if k.startswith(("swinViT.", "encoder"))}
    meta = new_bundle_meta("voco-fs12-ssl-x", "0.1.0", "backbone", "swinunetr",
                           {"feature_size": 12, "in_channels": 1, "patch_merging": "legacy"}, preprocessing=PRE)
    bb = ModelBundle(meta=meta).save(tmp_path / "backbone", sd)
    init = resolve_init(str(bb), PHANTOM_LABELS)
    assert init.kind == "backbone" and init.arch[1]["out_channels"] == 9 and init.preprocessing["spacing"] == [8.0] * 3
    model = init.build()
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], sd[key])
    assert init.bundle_meta("m", "1.0.0", [64] * 3, {"cohort": "/c"})["parent"]["id"] == "voco-fs12-ssl-x"
    # an official-style checkpoint file (module./backbone. prefixes) works as --init too
    ckpt = tmp_path / "voco.pt"
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}}, ckpt)
    init2 = resolve_init(str(ckpt), PHANTOM_LABELS, preprocessing=PRE)
    assert init2.kind == "checkpoint" and init2.arch[1]["feature_size"] == 12
    assert torch.equal(init2.build().state_dict()[key], sd[key])
    with pytest.raises(UserError, match="not a VoCo / SwinUNETR checkpoint"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.pt")
        resolve_init(str(tmp_path / "bad.pt"), PHANTOM_LABELS)


UNET = {"in_channels": 1, "out_channels": 9, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def test_finetune_improves_validation_dice_over_its_start_bundle(tmp_path: Path, home: Path) -> None:
    """The issue's gain test, on a bundle of MONAI's UNet (any bundle can be finetuned): a SwinUNETR step is 10-30 s
    on the CI CPU, too slow for the tens of steps a measurable gain needs; this UNet trains in ~0.3 s a step.
    Measured on this CPU: validation Dice 0.018 (random start) → 0.29 after 60 steps (liver 0.77, lungs 0.56)."""
    torch.manual_seed(0)
    meta = new_bundle_meta("tiny-unet", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE,
                           inference={"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 2}, channel_values=[0, *PHANTOM_LABELS.values])
    start = ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(tmp_path / "start", build_model("unet", UNET)
                                                              .state_dict())
    cohort = phantom_cohort(tmp_path / "cohort", labelled=3, unlabelled=2)
    summary = run_finetune(FinetuneOptions(cohort.root, str(start), tmp_path / "run", steps=60, lr=1e-2, batch=2,
                                           semi_start=0.5, confidence=0.8, eval_every=15, device="cpu", amp="off"))
    assert summary["start_val_dice"] < 0.05
    assert summary["best_val_dice"] > summary["start_val_dice"] + 0.1, summary
    new = ModelBundle.load(summary["installed"])
    assert new.architecture[0] == "unet" and new.meta["training"]["sampler"] == "classes"
    assert new.meta["training"]["start_val_dice"] < new.meta["metrics"]["val_dice"]
    # the gain is real on a case the finetune never saw, through the inference pipeline
    from vocoslicer.infer.segment import segment_image
    from vocoslicer.metrics import dice_per_label, mean_dice

    ph = generate_phantom(50, spacing=(8, 8, 8))
    truth = sitk.GetArrayViewFromImage(ph.label)
    after = mean_dice(dice_per_label(sitk.GetArrayViewFromImage(segment_image(ph.image, new, device="cpu")), truth,
                                     PHANTOM_LABELS.values))
    before_b = ModelBundle.load(start)
    before = mean_dice(dice_per_label(sitk.GetArrayViewFromImage(segment_image(ph.image, before_b, device="cpu")),
                                      truth, PHANTOM_LABELS.values))
    assert after > before + 0.05, (before, after)


def test_class_balanced_crops_centre_small_structures() -> None:
    """--sampler classes: a structure of a few voxels is in most crops, not in the few that pos/neg gives it."""
    from vocoslicer.train.segmentation import CropStream, PreparedCase

    lab = torch.zeros(1, 96, 96, 96, dtype=torch.uint8)
    lab[0, 10:70, 10:70, 10:70] = 1  # a big organ
    lab[0, 85:88, 85:88, 85:88] = 2  # a small one, far away
    case = PreparedCase("c", torch.rand(1, 96, 96, 96), lab)

    def share_with_small(**kw: object) -> float:
        it = iter(CropStream([case], (32, 32, 32), batch_size=1, seed=0, augment=False, **kw))
        return sum(bool((next(it)["label"] == 2).any()) for _ in range(60)) / 60

    balanced, posneg = share_with_small(class_ratios=[1, 1, 1]), share_with_small()
    assert balanced > 0.25 and posneg < 0.15, (balanced, posneg)
    with pytest.raises(UserError, match="class_ratios"):
        CropStream([case], (32, 32, 32), class_ratios=[0, 0, 0])


def test_voco_seg_model_trains_the_encoder_with_the_voco_loss() -> None:
    """The VoCo term reaches the segmentation network's own encoder (not a copy) and moves the teacher head."""
    from vocoslicer.models.voco_head import VoCoSegModel
    from vocoslicer.ssl.voco import position_labels

    torch.manual_seed(0)
    net = build_model("swinunetr", ARGS)
    model = VoCoSegModel(net, hidden_dim=32, out_dim=16).train()
    assert model.net is net
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    x = torch.rand(1, 1, 64, 64, 32)  # 64×64×32: the smallest crop whose bottleneck norm has > 1 voxel
    rand, base = torch.rand(2, 1, 64, 64, 32), torch.rand(4, 1, 64, 64, 32)  # 1 volume, sw 2, grid 2
    labels = torch.from_numpy(position_labels([[40, 50], [64, 64]], 2, 64)).float()[None]
    logits, loss, parts = model(x, rand, base, labels)
    assert logits.shape == (1, 9, 64, 64, 32) and torch.isfinite(loss) and set(parts) == {"intra", "inter", "reg"}
    loss.backward()
    assert net.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0  # the encoder learns from VoCo
    assert net.out.conv.conv.weight.grad is None  # the decoder does not (the logits are not in this loss)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(teacher0, model.teacher.parameters(), strict=True))  # EMA
    assert torch.equal(model(x).detach(), net(x).detach())  # plain forward = the segmentation network
    with pytest.raises(TypeError, match="SwinUNETR"):
        VoCoSegModel(build_model("unet", UNET))


@pytest.mark.slow
def test_finetune_with_voco_loss_term_resumes_and_writes_a_plain_bundle(tmp_path: Path, home: Path) -> None:
    bundle = start_bundle(tmp_path / "start")
    cohort = phantom_cohort(tmp_path / "cohort", labelled=2, unlabelled=1)
    out = tmp_path / "run"
    opts = dict(cohort=cohort.root, init=str(bundle), out=out, steps=3, lr=1e-3, batch=1, roi=[64, 64, 32],
                semi_start=0.5, confidence=0.5, eval_every=3, device="cpu", amp="off", ssl_weight=0.5,
                ssl_grid=2, ssl_sw=1)
    polls = []
    with pytest.raises(Cancelled):
        run_finetune(FinetuneOptions(**opts), should_stop=lambda: polls.append(1) or len(polls) >= 1)
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 1 and any(k.startswith("student.") for k in ck["model"])  # heads resume with the run
    summary = run_finetune(FinetuneOptions(**opts, resume=True))
    assert summary["steps"] == 3
    train = [h for h in summary_history(out) if h["split"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(h["ssl"])) for h in train)
    assert {"ssl_intra", "ssl_inter", "ssl_reg", "sup"} <= set(train[-1])
    new = ModelBundle.load(summary["installed"])
    assert new.meta["training"]["ssl_weight"] == 0.5 and new.meta["training"]["ssl_grid"] == 2
    sd = new.state_dict()
    assert not any(k.startswith(("net.", "student.", "teacher.")) for k in sd)  # a plain SwinUNETR bundle
    new.build_model().load_state_dict(sd)
    with pytest.raises(UserError, match="needs a SwinUNETR"):
        unet = ModelBundle(meta=new_bundle_meta("u", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE,
                                                channel_values=[0, *PHANTOM_LABELS.values]),
                           labels=PHANTOM_LABELS).save(tmp_path / "unet", build_model("unet", UNET).state_dict())
        run_finetune(FinetuneOptions(cohort.root, str(unet), tmp_path / "r_unet", ssl_weight=1.0))


def test_weight_decay_flag_reaches_the_optimizer(tmp_path: Path) -> None:
    """``--weight-decay`` of both tasks ends in the AdamW param groups; unset, each task keeps its own default."""
    from vocoslicer.cli import build_parser
    from vocoslicer.commands import _finetune_cls
    from vocoslicer.commands.finetune import options_from
    from vocoslicer.train.finetune.common import train_config
    from vocoslicer.train.loop import Trainer

    base = ["finetune", "--cohort", "c", "--init", "scratch", "--out", str(tmp_path / "o"), "--device", "cpu"]
    cls = ["--task", "classification"]
    assert options_from(FinetuneOptions, build_parser().parse_args(base)).weight_decay == 1e-5
    assert _finetune_cls.options(build_parser().parse_args([*base, *cls])).weight_decay == 0.01
    given = ["--weight-decay", "0.02"]
    seg_opts = options_from(FinetuneOptions, build_parser().parse_args([*base, *given]))
    cls_opts = _finetune_cls.options(build_parser().parse_args([*base, *cls, *given]))
    for opts in (seg_opts, cls_opts):
        assert opts.weight_decay == 0.02
        trainer = Trainer(torch.nn.Linear(2, 1), train_config(opts, 0, "val_dice"), None,
                          lambda m, b: (m(b).sum(), {}), [torch.zeros(1, 2)])
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.02]

