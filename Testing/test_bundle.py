"""Model bundles: save/load round trip, integrity checks, label/head consistency, installed-model resolution."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from vocoslicer.errors import UserError
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models import installed
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta

LABELS = LabelTable((Label(1, "liver", (220, 100, 80)), Label(2, "spleen", (150, 60, 160))))


class Tiny(torch.nn.Module):
    def __init__(self, out_channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, out_channels, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(autouse=True)
def _tiny_arch():
    from vocoslicer.models import factory

    with factory.temporary_architecture("tiny", lambda out_channels=3: Tiny(out_channels)):
        yield


def _bundle(out_channels: int = 3, labels: LabelTable = LABELS) -> ModelBundle:
    meta = new_bundle_meta("test-model", "1.0.0", "segmentation", "tiny", {"out_channels": out_channels})
    return ModelBundle(meta=meta, labels=labels)


def test_round_trip_and_sha(tmp_path):
    model = Tiny()
    path = _bundle().save(tmp_path / "b", model.state_dict())
    assert sorted(p.name for p in path.iterdir()) == ["labels.csv", "model.json", "weights.safetensors"]
    loaded = ModelBundle.load(path)
    assert loaded.labels == LABELS and loaded.channel_values == [0, 1, 2]
    rebuilt = loaded.build_model()
    assert torch.equal(rebuilt.conv.weight, model.conv.weight)
    assert LabelTable.read_csv(path / "labels.csv") == LABELS
    # tampered weights are detected before they are used
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch"):
        loaded.build_model()


def test_labels_must_match_head(tmp_path):
    with pytest.raises(UserError, match="3 output channels but the label table defines 2"):
        _bundle(out_channels=3, labels=LabelTable((Label(1, "liver"),))).save(tmp_path / "b", Tiny().state_dict())
    assert not (tmp_path / "b").exists()  # nothing half-written
    assert not list(tmp_path.iterdir())


def test_corrupt_inputs_are_user_errors(tmp_path):
    (tmp_path / "nojson").mkdir()
    with pytest.raises(UserError, match="no model.json"):
        ModelBundle.load(tmp_path / "nojson")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable model.json"):
        ModelBundle.load(bad)
    path = _bundle().save(tmp_path / "ok", Tiny().state_dict())
    meta = json.loads((path / "model.json").read_text())
    meta["weights"]["sha256"] = None
    (path / "model.json").write_text(json.dumps(meta))
    (path / "weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot load weights"):
        ModelBundle.load(path).build_model()


def test_overwrite_is_atomic_and_zip_loads(tmp_path):
    first = Tiny()
    path = _bundle().save(tmp_path / "b", first.state_dict())
    with pytest.raises(UserError, match="already exists"):
        _bundle().save(path, Tiny().state_dict())
    second = Tiny()
    _bundle().save(path, second.state_dict(), overwrite=True)
    assert torch.equal(ModelBundle.load(path).build_model().conv.weight, second.conv.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    zpath = tmp_path / "b.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in path.iterdir():
            zf.write(f, f"bundle/{f.name}")
    assert ModelBundle.load(zpath).id == "test-model"


def test_installed_install_resolve_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    b = _bundle()
    installed.install(b.save(tmp_path / "v1", Tiny().state_dict()))
    assert installed.next_version("test-model") == "1.0.1"
    b2 = _bundle()
    b2.meta["version"] = "1.0.1"
    installed.install(b2.save(tmp_path / "v2", Tiny().state_dict()))
    assert installed.resolve("test-model").version == "1.0.1"
    assert installed.resolve("test-model@1.0.0").version == "1.0.0"
    assert installed.resolve(str(tmp_path / "v1")).version == "1.0.0"
    with pytest.raises(UserError, match="already installed"):
        installed.install(tmp_path / "v1")
    with pytest.raises(UserError, match="neither a bundle path nor an installed model"):
        installed.resolve("other-model")
    installed.remove("test-model@1.0.1")
    assert installed.resolve("test-model").version == "1.0.0"


def test_install_stays_in_the_models_home(tmp_path, monkeypatch):
    """The finetuner installs through installed.install: a traversal id or version never leaves the home."""
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    src = _bundle().save(tmp_path / "b", Tiny().state_dict())
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.0.0").mkdir()
    (tmp_path / "x" / "1.0.0" / "keep.txt").write_text("user data")
    for meta in ({"id": "../../x"}, {"id": ".."}, {"version": "../../../x/1.0.0"}, {"id": "a/b"}):
        with pytest.raises(UserError, match="model id|model version"):
            installed.install(src, overwrite=True, meta=meta)
    data = json.loads((src / "model.json").read_text())
    data["id"] = "../../x"
    (src / "model.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="model id '../../x'"):
        installed.install(src, overwrite=True)
    with pytest.raises(UserError, match="model id"):
        installed.next_version("../../x")  # what finetune asks first, before any training
    with pytest.raises(UserError, match="model id"):
        ModelBundle(meta={**_bundle().meta, "id": "../x"}, labels=LABELS).save(tmp_path / "c", Tiny().state_dict())
    assert (tmp_path / "x" / "1.0.0" / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "x"]  # ids are checked before the home is touched


def test_install_verifies_and_leaves_no_staging(tmp_path, monkeypatch):
    """Item 9/11: the network is built on meta and loaded before anything is installed; a failure cleans up."""
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    src = _bundle().save(tmp_path / "b", Tiny().state_dict())
    from safetensors.torch import save_file

    from vocoslicer.models.bundle import sha256_file

    wrong = {"conv.weight": torch.zeros(5, 1, 1, 1, 1), "conv.bias": torch.zeros(5)}
    save_file(wrong, str(src / "weights.safetensors"))
    data = json.loads((src / "model.json").read_text())
    data["weights"]["sha256"] = sha256_file(src / "weights.safetensors")
    (src / "model.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="size mismatch for conv.weight"):
        installed.install(src)
    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir()) == [".staging"] and not any((models / ".staging").iterdir())


def test_labels_csv_must_agree_with_model_json(tmp_path):
    path = _bundle().save(tmp_path / "b", Tiny().state_dict())
    (path / "labels.csv").write_text("value,name,r,g,b\n1,liver,220,100,80\n2,kidney,150,60,160\n")
    with pytest.raises(UserError, match="disagrees with model.json at label value 2"):
        ModelBundle.load(path)


def test_saved_bundles_honour_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    old = os.umask(0o022)
    try:
        path = _bundle().save(tmp_path / "b", Tiny().state_dict())
        bundle = installed.install(path)
    finally:
        os.umask(old)
    for folder in (path, bundle.path):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
