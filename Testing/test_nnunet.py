"""The official nnU-Net VoComni model: checkpoints built from the official class (dynamic-network-architectures'
PlainConvUNet with the plans) with random weights, in each plausible layout, import with 0 missing keys and segment a
phantom on its input grid; the network sees nnU-Net's (z, y, x) layout and CTNormalization exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.cli import main
from vocoslicer.infer.preprocess import intensity_window
from vocoslicer.models import nnunet

pytest.importorskip("dynamic_network_architectures")


def official_network(num_classes: int = 21) -> torch.nn.Module:
    """The network as nnU-Net builds it from VoComni's plans (not through our wrapper)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3,
                         [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [2] * 6, num_classes,
                         [2] * 5, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return official_network()


@pytest.mark.parametrize("layout", ["flat", "network_weights", "state_dict"])
def test_checkpoint_layouts_import_with_no_missing_key(layout, official, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    sd = official.state_dict()
    obj = {"flat": sd, "network_weights": {"network_weights": sd, "optimizer_state": {}, "current_epoch": 999},
           "state_dict": {"state_dict": sd, "epoch": 3}}[layout]
    ckpt = tmp_path / "VoComni_nnunet.pt"
    torch.save(obj, ckpt)
    assert main(["models", "import", str(ckpt), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["id"] == "vocomni-nnunet" and result["task"] == "segmentation"
    from vocoslicer.models.installed import resolve

    bundle = resolve("vocomni-nnunet")
    report = bundle.meta["source"]["load_report"]
    assert report["missing"] == [] and report["mismatched"] == []
    assert bundle.meta["source"]["inferred"]["layout"] == ("flat" if layout == "flat" else layout)
    assert bundle.architecture[0] == "vocomni_nnunet" and len(bundle.labels) == 20
    assert report["unexpected"] == []  # nnU-Net's alias names are the same tensors, not extra ones
    model = bundle.build_model()  # strict: every tensor present
    full = torch.nn.Module.state_dict(model)  # every name PlainConvUNet has, aliases included
    assert full.keys() == sd.keys() and all(torch.equal(full[k], v) for k, v in sd.items())
    assert len(model.state_dict()) < len(sd)  # the bundle stores each tensor once


def test_wrapper_feeds_the_official_layout(official):
    from vocoslicer.models.factory import build_model

    ours = build_model("vocomni_nnunet", {"out_channels": 21}).eval()
    ours.load_state_dict(official.state_dict())
    official.eval().decoder.deep_supervision = False
    x = torch.randn(1, 1, 64, 64, 32)  # engine layout (X, Y, Z), RAS; 2x2x2 at the bottleneck
    with torch.no_grad():
        got = ours(x)
        ref = official(x.flip(2, 3).permute(0, 1, 4, 3, 2))  # what nnU-Net sees: (z, y, x), LPS
    torch.testing.assert_close(got, ref.permute(0, 1, 4, 3, 2).flip(2, 3))


def test_mirroring_averages_the_logits_of_all_eight_flips():
    import itertools

    from vocoslicer.models.factory import build_model

    small = {"out_channels": 3, "features": [4, 8], "strides": [[1, 1, 1], [2, 2, 2]]}  # same code path, tiny
    plain = build_model("vocomni_nnunet", small).eval()
    mirrored = build_model("vocomni_nnunet", {**small, "mirror": True}).eval()
    mirrored.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 8, 6)
    with torch.no_grad():
        flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
        ref = sum(torch.flip(plain(torch.flip(x, a)), a) if a else plain(x) for a in flips) / 8
        torch.testing.assert_close(mirrored(x), ref)


def test_ct_normalization_is_exact():
    hu = np.random.default_rng(0).uniform(-3000, 3000, size=(4096,)).astype(np.float32)
    n = nnunet.CT_NORMALIZATION
    ref = (np.clip(hu.astype(np.float64), n["lower"], n["upper"]) - n["mean"]) / n["std"]
    np.testing.assert_allclose(intensity_window(hu, nnunet.ct_normalization_window()), ref, rtol=1e-5, atol=1e-9)


def test_segments_a_phantom_on_its_input_grid(official, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    ckpt = tmp_path / "VoComni_nnunet.pt"
    torch.save({"network_weights": official.state_dict()}, ckpt)
    assert main(["phantom", "--seed", "3", "-o", str(tmp_path / "ph"), "--size", "48", "40", "24", "--spacing", "3",
                 "3", "4"]) == 0
    ct = tmp_path / "ph" / "phantom_3_ct.nii.gz"
    assert main(["segment", str(ct), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(ckpt), "--fast",
                 "--device", "cpu"]) == 0  # an official file given directly, converted on the fly
    seg, img = sitk.ReadImage(str(tmp_path / "seg.nii.gz")), sitk.ReadImage(str(ct))
    assert seg.GetSize() == img.GetSize() and seg.GetSpacing() == img.GetSpacing()
    assert seg.GetOrigin() == img.GetOrigin() and seg.GetDirection() == img.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= set(range(21))


def test_class_count_comes_from_the_tensors_not_the_catalog(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    torch.manual_seed(1)
    ckpt = tmp_path / "VoComni_nnunet.pt"  # the catalog's file name, but a 14-class (BTCV) network
    torch.save({"state_dict": official_network(num_classes=14).state_dict()}, ckpt)
    assert main(["models", "import", str(ckpt), "--json"]) == 0
    from vocoslicer.models.installed import resolve

    bundle = resolve(json.loads(capsys.readouterr().out)["id"])
    assert bundle.architecture[1]["out_channels"] == 14 and bundle.labels.by_value(1).name == "spleen"
    assert len(bundle.labels) == 13 and bundle.meta["source"]["inferred"]["out_channels"] == 14
