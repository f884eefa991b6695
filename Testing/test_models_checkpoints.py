"""Official VoCo checkpoint loading: renames, name+shape copy, and a report of everything not loaded.

Checkpoints are built with the official key layout from the reference key files (voco_B_ssl_keys.txt: the v2
SSL VoCoHead; voco_B_btcv_keys.txt: SwinUNETR-v2 with 14 classes), scaled from feature size 48 to 12 (every
dimension that is a multiple of 48 is divided by 4) so that the tests stay tiny.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vocoslicer.errors import UserError
from vocoslicer.models.checkpoints import load_official_weights, official_state_dict, read_checkpoint
from vocoslicer.models.swin import build_swinunetr

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIRS = (ROOT / "Testing" / "data" / "reference", ROOT.parent / "shared" / "reference")


def reference_shapes(name: str, scale: int = 4) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a reference key file, with multiples of 48 divided by ``scale``."""
    path = next((d / name for d in REFERENCE_DIRS if (d / name).is_file()), None)
    if path is None:
        pytest.skip(f"reference key file {name} not available")
    out: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            out[key] = tuple(int(v) // scale if int(v) % 48 == 0 else int(v) for v in re.findall(r"\d+", shape))
    return out


def fake_checkpoint(shapes: dict[str, tuple[int, ...]], model: torch.nn.Module, prefix: str = "",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the given names/shapes; index buffers copied from ``model`` so they stay valid."""
    g = torch.Generator().manual_seed(seed)
    own = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        bare = key.replace("backbone.", "")
        if key.endswith("relative_position_index"):
            sd[prefix + key] = own[bare].clone()
        else:
            sd[prefix + key] = torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_swinunetr(None, feature_size=12, out_channels=14)


def test_scaled_reference_equals_tiny_model_layout(tiny: torch.nn.Module) -> None:
    got = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    assert got == reference_shapes("voco_B_btcv_keys.txt")


def test_ssl_training_checkpoint_loads_every_backbone_tensor(tiny: torch.nn.Module, tmp_path: Path) -> None:
    # v2 SSL training checkpoint: {"global_step", "state_dict": {"module.backbone.*", "module.student.*", ...}}
    ssl = reference_shapes("voco_B_ssl_keys.txt")
    sd = fake_checkpoint(ssl, tiny, prefix="module.")
    path = tmp_path / "model_step20000.pt"
    torch.save({"global_step": 20000, "state_dict": sd}, path)
    model = build_swinunetr(None, feature_size=12, out_channels=14)
    report = load_official_weights(model, path)
    assert report.container == "state_dict"
    assert len(report.loaded) == 145 and report.missing_backbone == []
    assert all(k.startswith(("decoder", "out.")) for k in report.missing) and len(report.missing) == 22
    assert sorted({k.split(".")[0] for k in report.unexpected}) == ["student", "teacher"]
    assert len(report.unexpected) == 12 and not report.mismatched
    key = "swinViT.layers2.0.blocks.1.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], sd["module.backbone." + key])
    line = report.summary()
    assert "loaded 145/167" in line and "decoder" in line and "\n" not in line


def test_released_ssl_head_flat_and_backbone_prefixed(tiny: torch.nn.Module, tmp_path: Path) -> None:
    # released VoCo_*_SSL_head.pt: the 145-tensor backbone subset, flat (with or without "backbone.")
    ssl = {k: v for k, v in reference_shapes("voco_B_ssl_keys.txt").items() if k.startswith("backbone.")}
    assert len(ssl) == 145
    for prefix_strip in (False, True):
        shapes = {k.replace("backbone.", "") if prefix_strip else k: v for k, v in ssl.items()}
        path = tmp_path / f"VoCo_B_SSL_head_{prefix_strip}.pt"
        torch.save(fake_checkpoint(shapes, tiny), path)
        report = load_official_weights(build_swinunetr(None, feature_size=12, out_channels=14), path)
        assert len(report.loaded) == 145 and report.missing_backbone == [] and report.unexpected == []
        assert report.container == ""


def test_vocomni_full_model_with_numpy_scalar_and_other_class_count(tmp_path: Path) -> None:
    # VoComni_*.pt: trainer format {"epoch", "best_acc": numpy float, "state_dict"} with out_channels=21
    model21 = build_swinunetr(None, feature_size=12, out_channels=21)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model21.state_dict().items()}
    path = tmp_path / "VoComni_B.pt"
    torch.save({"epoch": 7, "best_acc": np.float64(0.83), "state_dict": sd}, path)
    full = load_official_weights(build_swinunetr(None, feature_size=12, out_channels=21), path)
    assert len(full.loaded) == 167 and not full.missing and not full.mismatched
    other = load_official_weights(build_swinunetr(None, feature_size=12, out_channels=14), path)
    assert [k for k, _, _ in other.mismatched] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert other.mismatched[1][1:] == ((21,), (14,))
    assert len(other.loaded) == 165 and other.missing_backbone == []


def test_swin_vit_rename_and_v1_student_copy(tiny: torch.nn.Module) -> None:
    own = tiny.state_dict()
    renamed = {k.replace("swinViT", "swin_vit"): v for k, v in own.items()}
    sd, container, renames = official_state_dict({"net": renamed})
    assert container == "net" and set(sd) == set(own) and "swin_vit->swinViT" in renames
    v1 = {**{f"student.{k}": v for k, v in own.items()}, **{f"teacher.{k}": v + 1 for k, v in own.items()
                                                              if v.is_floating_point()}}
    report = load_official_weights(build_swinunetr(None, feature_size=12, out_channels=14), {"state_dict": v1})
    assert len(report.loaded) == 167 and not report.unexpected


def test_corrupted_truncated_and_empty_files(tiny: torch.nn.Module, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(tiny.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("trunc.pt", "junk.pt", "empty.pt", "absent.pt"):
        with pytest.raises(UserError) as exc:
            read_checkpoint(tmp_path / name)
        assert name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="no tensors"):
        official_state_dict({"epoch": 3})


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    # weights_only=True: an arbitrary object in the pickle is rejected, not executed
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "obj": Path("x")}, path)
    with pytest.raises(UserError):
        read_checkpoint(path)
