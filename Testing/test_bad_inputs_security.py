"""Issue 18, filesystem part: hostile ids, manifests, bundles, zips and pickles against the real CLI.

One table of cases drives one parametrized test. Each case gets a fresh copy of a small world (a models home, a
cohort with one labelled case, a victim folder outside both, prepared inputs), runs ``python -m vocoslicer`` in
a subprocess with ``VOCOSLICER_HOME`` inside it, and must end with the expected exit code, exactly one stderr
line and no traceback; every file of the world is fingerprinted before and after, so a change outside the root the
command may touch is a *hole* and a new or changed file inside it is a *file left behind*. The malicious pickles
carry a positive control (``test_pickle_payload_is_live``): loading them without ``weights_only`` really creates
the marker file, so "marker absent" in the table means the defence held, not that the payload was dud.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model

ROOT = Path(__file__).resolve().parents[1]
UNET = {"in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2], "num_res_units": 0}
TABLE = LabelTable((Label(1, "liver", (200, 0, 0)), Label(2, "spleen", (0, 200, 0))))


class Evil:
    """A pickle whose loading creates ``marker`` (what a real attack would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (builtins.open, (self.marker, "w"))


def _image(path: Path, seed: int, label: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.zeros((12, 12, 12), np.uint8) if label else rng.normal(size=(12, 12, 12)).astype(np.float32)
    if label:
        arr[2:6, 2:6, 2:6], arr[7:10, 7:10, 7:10] = 1, 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((float(seed), 0.0, 0.0))
    sitk.WriteImage(img, str(path))
    return path


def _save_bundle(out: Path, model_id: str = "tiny-unet", version: str = "1.0.0", **meta_extra) -> Path:
    torch.manual_seed(0)
    meta = new_bundle_meta(model_id, version, "segmentation", "unet", UNET,
                           inference={"roi_size": [16, 16, 16], "overlap": 0.5, "sw_batch_size": 1}, **meta_extra)
    return ModelBundle(meta=meta, labels=TABLE).save(out, build_model("unet", UNET).state_dict())


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world every case copies: ``home/``, ``cohort/``, ``victim/``, ``inputs/``."""
    w = tmp_path_factory.mktemp("world")
    (w / "home" / "models").mkdir(parents=True)
    victim = w / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "secret.txt").write_text("user data\n")
    (victim / "sub" / "keep.txt").write_text("more user data\n")
    (victim / "1.0.0").mkdir()
    (victim / "1.0.0" / "model.json").write_text("{}\n")
    inputs = w / "inputs"
    inputs.mkdir()
    _save_bundle(inputs / "good")
    torch.save(build_model("unet", UNET).state_dict(), inputs / "tiny_unet.pt")
    _image(inputs / "img2.nii.gz", 2)
    _image(inputs / "img1.nii.gz", 1)
    _image(inputs / "lab1.nii.gz", 1, label=True)
    TABLE.write_csv(inputs / "labels.csv")
    c = Cohort.init(w / "cohort")
    c.add(inputs / "img1.nii.gz", inputs / "lab1.nii.gz", inputs / "labels.csv")
    installed = w / "home" / "models" / "installed-model" / "1.0.0"  # for the remove cases to aim next to
    shutil.copytree(inputs / "good", installed)
    _edit_json(installed / "model.json", lambda d: d.update(id="installed-model"))
    return w


# ---------------------------------------------------------------- builders of hostile inputs
def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def bundle_with(**changes: object) -> Callable[[Path], None]:
    """A copy of the good bundle (``inputs/evil``) with model.json fields replaced."""
    def setup(w: Path) -> None:
        shutil.copytree(w / "inputs" / "good", w / "inputs" / "evil")
        _edit_json(w / "inputs" / "evil" / "model.json", lambda d: d.update(changes))
    return setup


def manifest_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit both manifest copies of the cohort (a received cohort folder: the backup is hostile too)."""
    def setup(w: Path) -> None:
        for name in ("manifest.json", "manifest.bak.json"):
            _edit_json(w / "cohort" / name, fn)
    return setup


def first_case(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda d: fn(d["cases"]["case0001"])


def rename_case(new: str) -> Callable[[dict], None]:
    def fn(d: dict) -> None:
        rec = d["cases"].pop("case0001")
        rec["id"] = new
        d["cases"][new] = rec
    return fn


def _set_label_path(path: str) -> Callable[[dict], None]:
    return first_case(lambda r: r["labels"][0].update(path=path))


def evil_pickle_pt(w: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil(w / "MARKER")}, w / "inputs" / "evil.pt")


def evil_pickle_bundle(w: Path) -> None:
    from vocoslicer.models.bundle import sha256_file

    b = w / "inputs" / "evil"
    shutil.copytree(w / "inputs" / "good", b)
    (b / "weights.safetensors").unlink()
    torch.save({"state_dict": Evil(w / "MARKER")}, b / "weights.pt")
    _edit_json(b / "model.json", lambda d: d.update(weights={"file": "weights.pt", "sha256": sha256_file(
        b / "weights.pt")}))


def zip_with(member: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        with zipfile.ZipFile(w / "inputs" / "evil.zip", "w") as zf:
            for f in (w / "inputs" / "good").iterdir():
                zf.write(f, f"bundle/{f.name}")
            zf.writestr(member, "pwned\n")
    return setup


def _corrupt(data: bytes) -> bytes:
    """Flip bytes in the middle of the first member's compressed data (the CRC check must catch it)."""
    mid = len(data) // 3
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]


def wrong_shapes(w: Path) -> None:
    bundle_with()(w)
    other = {**UNET, "channels": [8, 16]}
    from safetensors.torch import save_file

    from vocoslicer.models.bundle import sha256_file

    wf = w / "inputs" / "evil" / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("unet", other).state_dict().items()}, str(wf))
    _edit_json(w / "inputs" / "evil" / "model.json", lambda d: d["weights"].update(sha256=sha256_file(wf)))


def labels_csv_disagrees(w: Path) -> None:
    bundle_with()(w)
    (w / "inputs" / "evil" / "labels.csv").write_text("value,name,r,g,b\n1,liver,200,0,0\n2,kidney,0,200,0\n")


def link_in_bundle(name: str, target: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        bundle_with()(w)
        p = w / "inputs" / "evil" / name
        p.unlink(missing_ok=True)
        p.symlink_to(w / target)
    return setup


def catalog_entry(**changes: object) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        entry = {"id": "c", "version": "1.0.0", "title": "t", "url": "http://127.0.0.1:9/x.pt", "filename": "x.pt",
                 "task": "backbone", "architecture": {"name": "unet", "args": UNET}, **changes}
        (w / "inputs" / "catalog.json").write_text(json.dumps({"format": "vocoslicer-catalog/1", "models": [entry]}))
    return setup


def both(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda w: [fn(w) for fn in fns] and None


def symlink(path: str, target: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        p = w / path
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        p.symlink_to(w / target, target_is_directory=True)
    return setup


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class BadInput:
    name: str
    args: tuple[str, ...]  # "{w}" is the case's world folder
    setup: Callable[[Path], None] | None = None
    allowed: str = "home"  # the only folder the command may change (relative to the world)
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    must: str = ""  # a word the one stderr line must contain (names the problem)
    slow: bool = False  # the variants of a case kept in the fast set (each torch-importing CLI call takes seconds)
    left_ok: str = ""  # a prefix inside ``allowed`` where files may remain (a known, separately owned issue)


EV = "{w}/inputs/evil"
ABSOLUTE_TARGETS = ("/tmp/vocoslicer-pwned-zip", "/tmp/vocoslicer-pwned-id")
CASES = [
    # item 1: ids and versions from model.json, flags and file names
    BadInput("bundle id ../../../x", ("models", "import", EV), bundle_with(id="../../../x"), must="model id"),
    BadInput("bundle id ..", ("models", "import", EV), bundle_with(id=".."), must="model id", slow=True),
    BadInput("bundle id a/b", ("models", "import", EV), bundle_with(id="a/b"), must="model id", slow=True),
    BadInput("bundle id absolute", ("models", "import", EV), bundle_with(id="/tmp/vocoslicer-pwned-id"),
             must="model id", slow=True),
    BadInput("bundle version ../../v", ("models", "import", EV), bundle_with(version="../../v"), must="version",
             slow=True),
    BadInput("bundle version ..", ("models", "import", EV), bundle_with(version=".."), must="version", slow=True),
    BadInput("bundle id not a string", ("models", "import", EV), bundle_with(id=["x"]), must="model id", slow=True),
    BadInput("--force onto ../../victim", ("models", "import", EV, "--force"),
             bundle_with(id="../../victim", version="1.0.0"), must="model id"),
    BadInput("--version ../../x", ("models", "import", "{w}/inputs/good", "--version", "../../x"), must="--version",
             slow=True),
    BadInput("pt --id ../../x", ("models", "import", "{w}/inputs/tiny_unet.pt", "--id", "../../x"), must="--id"),
    BadInput("pt --id ../../x --force", ("models", "import", "{w}/inputs/tiny_unet.pt", "--id", "../../victim",
                                         "--force"), must="--id", slow=True),
    BadInput("--id .", ("models", "import", "{w}/inputs/tiny_unet.pt", "--id", "."), must="--id", slow=True),
    BadInput("--id ..", ("models", "import", "{w}/inputs/good", "--id", ".."), must="--id"),
    BadInput("--id empty", ("models", "import", "{w}/inputs/good", "--id", ""), must="--id", slow=True),
    BadInput("--id with NUL-ish", ("models", "import", "{w}/inputs/good", "--id", "a\\b"), must="--id", slow=True),
    BadInput("--id too long", ("models", "import", "{w}/inputs/good", "--id", "a" * 300), must="--id", slow=True),
    BadInput("--id device name", ("models", "import", "{w}/inputs/good", "--id", "con"), must="--id", slow=True),
    BadInput("weights file ../../victim/secret.txt", ("models", "import", EV),
             bundle_with(weights={"file": "../../victim/secret.txt"}), must="weights file", slow=True),
    BadInput("weights file a link out", ("models", "import", EV), link_in_bundle("weights.safetensors",
                                                                                 "victim/secret.txt"), slow=True),
    BadInput("README a link out", ("models", "import", EV), link_in_bundle("README.md", "victim/secret.txt"),
             must="outside", slow=True),
    BadInput("models home entry is a link out", ("models", "import", "{w}/inputs/good", "--force"),
             symlink("home/models/tiny-unet", "victim"), must="outside", slow=True),
    BadInput("catalog filename ../../x", ("models", "download", "c"), catalog_entry(filename="../../x.pt"),
             env={"VOCOSLICER_CATALOG": "{w}/inputs/catalog.json"}, must="filename", slow=True),
    BadInput("catalog id ..", ("models", "download", ".."), catalog_entry(id=".."),
             env={"VOCOSLICER_CATALOG": "{w}/inputs/catalog.json"}, must="id", slow=True),
    # item 2: remove
    BadInput("remove ../../victim", ("models", "remove", "../../victim"), must="model id"),
    BadInput("remove ..", ("models", "remove", ".."), must="model id"),
    BadInput("remove .", ("models", "remove", "."), must="model id", slow=True),
    BadInput("remove id@..", ("models", "remove", "installed-model@.."), must="version", slow=True),
    BadInput("remove id@../../victim", ("models", "remove", "installed-model@../../../victim"),
             must="version", slow=True),
    BadInput("remove empty", ("models", "remove", ""), must="model id", slow=True),
    # zips and pickles
    BadInput("zip member ../", ("models", "import", "{w}/inputs/evil.zip"), zip_with("../../victim/pwned.txt"),
             must="unsafe path"),
    BadInput("zip member absolute", ("models", "import", "{w}/inputs/evil.zip"), zip_with("/tmp/vocoslicer-pwned-zip"),
             must="unsafe path", slow=True),
    BadInput("zip damaged", ("models", "import", "{w}/inputs/evil.zip"),
             lambda w: (zip_with("bundle/extra.txt")(w), (w / "inputs" / "evil.zip").write_bytes(
                 _corrupt((w / "inputs" / "evil.zip").read_bytes()))), must="evil.zip", slow=True),
    BadInput("zip of a tampered bundle (no cache, no staging left)", ("models", "import", "{w}/inputs/evil.zip"),
             lambda w: (bundle_with(weights={"file": "weights.safetensors", "sha256": "0" * 64})(w),
                        shutil.make_archive(str(w / "inputs" / "evil"), "zip", w / "inputs" / "evil")),
             must="sha256"),
    BadInput("pickle .pt with payload", ("models", "import", "{w}/inputs/evil.pt", "--id", "evil"),
             evil_pickle_pt, must="evil.pt"),
    BadInput("pickle weights.pt in a bundle", ("models", "import", EV), evil_pickle_bundle, must="weights", slow=True),
    # item 9: import builds and loads the network
    BadInput("wrong weight shapes", ("models", "import", EV), wrong_shapes, must="size mismatch"),
    BadInput("impossible architecture args", ("models", "import", EV),
             bundle_with(architecture={"name": "unet", "args": {**UNET, "norm": "nonsense"}}), must="cannot be built",
             slow=True),
    BadInput("unknown architecture", ("models", "import", EV), bundle_with(architecture={"name": "nope"}),
             must="architecture", slow=True),
    BadInput("ROI the network cannot take", ("models", "import", EV),
             bundle_with(inference={"roi_size": [15, 16, 16]}), must="ROI"),
    BadInput("ROI zero", ("models", "import", EV), bundle_with(inference={"roi_size": [0, 16, 16]}), must="roi_size",
             slow=True),
    BadInput("ROI not numbers", ("models", "import", EV), bundle_with(inference={"roi_size": "big"}),
             must="roi_size", slow=True),
    BadInput("overlap 1.5", ("models", "import", EV), bundle_with(inference={"overlap": 1.5}), must="overlap",
             slow=True),
    BadInput("spacing NaN", ("models", "import", EV), bundle_with(preprocessing={"spacing": [1, 1, float("nan")]}),
             must="spacing", slow=True),
    BadInput("weights file missing", ("models", "import", EV),
             lambda w: (bundle_with()(w), (w / "inputs" / "evil" / "weights.safetensors").unlink()), must="missing",
             slow=True),
    BadInput("weights not safetensors", ("models", "import", EV),
             lambda w: (bundle_with()(w), (w / "inputs" / "evil" / "weights.safetensors").write_bytes(b"junk"),
                        _edit_json(w / "inputs" / "evil" / "model.json", lambda d: d["weights"].pop("sha256"))),
             must="cannot load weights", slow=True),
    BadInput("model.json a link out", ("models", "import", EV),
             lambda w: (bundle_with()(w), (w / "victim" / "model.json").write_text(
                 (w / "inputs" / "evil" / "model.json").read_text()), (w / "inputs" / "evil" / "model.json").unlink(),
                 (w / "inputs" / "evil" / "model.json").symlink_to(w / "victim" / "model.json")), must="outside",
             slow=True),
    BadInput("tampered weights (staging cleaned)", ("models", "import", EV),
             bundle_with(weights={"file": "weights.safetensors", "sha256": "0" * 64}), must="sha256"),
    # item 18: labels.csv vs model.json
    BadInput("labels.csv disagrees", ("models", "import", EV), labels_csv_disagrees, must="labels.csv"),
    # item 10: VOCOSLICER_HOME is a file
    BadInput("VOCOSLICER_HOME is a file", ("models", "list"), lambda w: (w / "homefile").write_text("x"),
             env={"VOCOSLICER_HOME": "{w}/homefile"}, must="VOCOSLICER_HOME"),
    BadInput("models home is a file", ("models", "list"), lambda w: (shutil.rmtree(w / "home" / "models"),
                                                                     (w / "home" / "models").write_text("x")),
             must="not a folder", slow=True),
    # item 3: hostile cohort manifests
    BadInput("cohort remove image ../x", ("cohort", "remove", "{w}/cohort", "case0001"),
             manifest_edit(first_case(lambda r: r.update(image="../victim/secret.txt"))), allowed="cohort",
             must="image path"),
    BadInput("cohort export image ../../../../etc/hostname", ("cohort", "export", "{w}/cohort", "--out", "{w}/out"),
             manifest_edit(first_case(lambda r: r.update(image="../../../../etc/hostname"))), allowed="cohort",
             must="image path"),
    BadInput("cohort export label absolute", ("cohort", "export", "{w}/cohort", "--out", "{w}/out"),
             manifest_edit(_set_label_path("/etc/hostname")), allowed="cohort", must="label path"),
    BadInput("cohort remove label ../../victim", ("cohort", "remove", "{w}/cohort", "case0001"),
             manifest_edit(_set_label_path("labels/case0001/../../../victim/secret.txt")), allowed="cohort",
             must="label path"),
    BadInput("cohort case id ..", ("cohort", "remove", "{w}/cohort", ".."), manifest_edit(rename_case("..")),
             allowed="cohort", must="case id"),
    BadInput("cohort label entry without path", ("cohort", "list", "{w}/cohort"),
             manifest_edit(first_case(lambda r: r["labels"][0].pop("path"))), allowed="cohort",
             must="without a path"),
    BadInput("cohort images/ is a link out", ("cohort", "add", "{w}/cohort", "--image", "{w}/inputs/img2.nii.gz"),
             symlink("cohort/images", "victim"), allowed="cohort", must="outside"),
    BadInput("cohort labels/ is a link out", ("cohort", "remove", "{w}/cohort", "case0001"),
             symlink("cohort/labels", "victim"), allowed="cohort", must="outside"),
    BadInput("cohort add --id ..", ("cohort", "add", "{w}/cohort", "--image", "{w}/inputs/img2.nii.gz", "--id", ".."),
             allowed="cohort", must="case id"),
    BadInput("cohort add --id a/b", ("cohort", "add", "{w}/cohort", "--image", "{w}/inputs/img2.nii.gz", "--id",
                                     "../a"), allowed="cohort", must="case id"),
    BadInput("cohort add --id for a known image", ("cohort", "add", "{w}/cohort", "--image", "{w}/inputs/img1.nii.gz",
                                                   "--id", "other"), allowed="cohort", must="already in the cohort"),
    BadInput("cohort export --out an existing file", ("cohort", "export", "{w}/cohort", "--out",
                                                      "{w}/inputs/labels.csv"), allowed="cohort", must="not a file"),
    BadInput("cohort init on a file", ("cohort", "init", "{w}/inputs/labels.csv"), allowed="cohort",
             must="is a file"),
    BadInput("cohort export into the cohort", ("cohort", "export", "{w}/cohort", "--out", "{w}/cohort/x"),
             allowed="cohort", must="inside the cohort"),
    # item 4: finetune --model-id (refused by the registry before any training or install)
    BadInput("finetune --model-id ../../x", ("finetune", "--cohort", "{w}/cohort", "--init", "{w}/inputs/good",
                                             "--model-id", "../../x", "--out", "{w}/home/runs/ft"),
             must="model id", slow=True,
             left_ok="home/runs/ft/"),  # issue 18 item 11 (engine helper): finetune opens events.jsonl before checks
]


# ---------------------------------------------------------------- running and checking
def _env(w: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "VoCoSlicer"),
           "VOCOSLICER_HOME": str(w / "home"), "VOCOSLICER_CATALOG": str(w / "inputs" / "no-catalog.json")}
    env.pop("VOCOSLICER_DEVICE", None)
    env.update({k: v.format(w=w) for k, v in (extra or {}).items()})
    return env


def fingerprint(w: Path) -> dict[str, str]:
    """Every file and link of the world -> content hash (links -> their target), so any change shows."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(w):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(w))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input(case: BadInput, template: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(template, w, symlinks=True)
    if case.setup is not None:
        case.setup(w)
    before = fingerprint(tmp_path)  # the world's parent too: a traversal that climbs out of it shows
    argv = [a.format(w=w) for a in case.args]
    proc = subprocess.run([sys.executable, "-m", "vocoslicer", *argv], env=_env(w, case.env), capture_output=True,
                          text=True, timeout=300)
    after = fingerprint(tmp_path)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    allowed = f"w/{case.allowed}/"
    holes = [k for k in changed if not k.startswith(allowed)]
    left = [k for k in changed if k.startswith(allowed) and not (case.left_ok and k.startswith("w/" + case.left_ok))]
    assert not (w / "MARKER").exists(), "the pickle payload ran"
    assert not any(Path(p).exists() for p in ABSOLUTE_TARGETS), "wrote to an absolute path"
    assert not holes, f"changed outside {case.allowed}/: {holes}"
    assert proc.returncode == case.code, f"exit {proc.returncode}: {proc.stderr}"
    assert len(err) == 1 and err[0].startswith("vocoslicer: error: ") and "Traceback" not in proc.stderr, err
    assert case.must in err[0], err[0]
    assert not left, f"left behind in {case.allowed}/: {left}"


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """Positive control: the pickles of the table really run code when loaded the unsafe way."""
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": Evil(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_the_good_inputs_pass(template: Path, tmp_path: Path) -> None:
    """Negative control: the unmodified inputs install, list and remove (the table's refusals are specific)."""
    w = tmp_path / "w"
    shutil.copytree(template, w, symlinks=True)
    env = _env(w)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vocoslicer", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    r = cli("models", "import", str(w / "inputs" / "good"), "--id", "ok-model", "--version", "2.0.0+local")
    assert r.returncode == 0, r.stderr
    assert (w / "home" / "models" / "ok-model" / "2.0.0+local" / "model.json").is_file()
    assert not any((w / "home" / "models" / ".staging").iterdir())
    assert cli("models", "remove", "ok-model@2.0.0+local").returncode == 0
    assert not (w / "home" / "models" / "ok-model").exists()
    r = cli("cohort", "export", str(w / "cohort"), "--out", str(w / "out"))
    assert r.returncode == 0, r.stderr
    assert (w / "out" / "imagesTr" / "case0001.nii.gz").is_file()
