"""Catalog, download (real HTTP server on 127.0.0.1 with Range support), checkpoint → bundle, models CLI.

No mocks: a ThreadingHTTPServer serves tiny checkpoints with the official key layout; one route drops the
connection half-way through the first transfer so that the resume path (HTTP Range) is exercised for real.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from vocoslicer.cli import main
from vocoslicer.errors import UserError
from vocoslicer.jobs.events import EventSink
from vocoslicer.models.catalog import find_entry, load_catalog
from vocoslicer.models.convert import infer_swin_args
from vocoslicer.models.download import download, install_from_catalog
from vocoslicer.models.swin import build_swinunetr


class Files:
    """What the test server serves, and what it saw."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.truncate_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []


def make_handler(files: Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?")[0]
            rng = self.headers.get("Range")
            files.requests.append((path, rng))
            body = files.data.get(path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng:
                m = re.match(r"bytes=(\d+)-$", rng)
                start = int(m.group(1)) if m else 0
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            chunk = body[start:]
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if path in files.truncate_once:
                files.truncate_once.discard(path)
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler


@pytest.fixture()
def server() -> Iterator[tuple[str, Files]]:
    files = Files()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(files))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()


def _bytes_of(obj: object, tmp: Path, name: str) -> bytes:
    torch.save(obj, tmp / name)
    return (tmp / name).read_bytes()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    seg = build_swinunetr(None, feature_size=12, out_channels=21)
    full = seg.state_dict()
    prefixes = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
    ssl = {f"backbone.{k}": v for k, v in full.items() if k.startswith(prefixes)}
    assert len(ssl) == 145
    return {
        "ssl": _bytes_of(ssl, tmp, "ssl.pt"),
        "omni": _bytes_of({"epoch": 5, "best_acc": np.float64(0.8), "state_dict": full}, tmp, "omni.pt"),
    }


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: tuple[str, Files],
         checkpoints: dict[str, bytes]) -> Path:
    base, files = server
    files.data["/tiny_ssl.pt"] = checkpoints["ssl"]
    files.data["/tiny_omni.pt"] = checkpoints["omni"]
    sha_omni = hashlib.sha256(checkpoints["omni"]).hexdigest()
    tiny = {"size": None, "feature_size": 12, "patch_merging": "legacy"}
    catalog = {"format": "vocoslicer-catalog/1", "models": [
        {"id": "tiny-ssl", "version": "1.0.0", "title": "tiny SSL", "url": f"{base}/tiny_ssl.pt?download=true",
         "filename": "tiny_ssl.pt", "task": "backbone", "architecture": {"name": "swinunetr", "args": tiny},
         "sha256": None},
        {"id": "tiny-omni", "version": "1.0.0", "title": "tiny VoComni", "url": f"{base}/tiny_omni.pt",
         "filename": "tiny_omni.pt", "task": "segmentation", "labels": "vocomni", "sha256": sha_omni,
         "architecture": {"name": "swinunetr", "args": {**tiny, "out_channels": 21}}},
        {"id": "tiny-wrong", "version": "1.0.0", "title": "SSL file declared as a segmentation model",
         "url": f"{base}/tiny_ssl.pt", "filename": "tiny_wrong.pt", "task": "segmentation", "labels": "vocomni",
         "architecture": {"name": "swinunetr", "args": {**tiny, "out_channels": 21}}},
        {"id": "tiny-bad", "version": "1.0.0", "title": "wrong checksum", "url": f"{base}/tiny_omni.pt",
         "filename": "tiny_bad.pt", "task": "segmentation", "labels": "vocomni", "sha256": "0" * 64,
         "architecture": {"name": "swinunetr", "args": {**tiny, "out_channels": 21}}},
    ]}
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    monkeypatch.setenv("VOCOSLICER_CATALOG", str(tmp_path / "catalog.json"))
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_shipped_catalog_is_valid() -> None:
    entries = load_catalog(Path(__file__).resolve().parents[1] / "VoCoSlicer" / "vocoslicer" / "resources"
                           / "models.json")
    ids = {e.id for e in entries}
    assert {"voco-b-ssl", "voco-l-ssl", "voco-h-ssl", "vocomni-b", "vocomni-l", "vocomni-h"} <= ids
    omni = find_entry("VoComni_B.pt", entries)
    assert omni is not None and omni.architecture["args"]["out_channels"] == 21 and omni.labels == "vocomni"
    assert all(e.url.startswith("https://huggingface.co/Luffy503/VoCo/") for e in entries)


def test_resume_after_truncated_transfer(tmp_path: Path, server: tuple[str, Files]) -> None:
    base, files = server
    payload = bytes(range(256)) * 4096  # 1 MiB
    files.data["/blob.bin"] = payload
    files.truncate_once.add("/blob.bin")
    dest = tmp_path / "blob.bin"
    sha = hashlib.sha256(payload).hexdigest()
    with pytest.raises(UserError, match="interrupted"):
        download(f"{base}/blob.bin", dest, sha)
    part = tmp_path / "blob.bin.part"
    assert part.stat().st_size == len(payload) // 2 and not dest.exists()
    result = download(f"{base}/blob.bin", dest, sha)
    assert files.requests[-1] == ("/blob.bin", f"bytes={len(payload) // 2}-")
    assert result.resumed_from == len(payload) // 2 and result.verified and result.sha256 == sha
    assert dest.read_bytes() == payload and not part.exists()


def test_sha_mismatch_installs_nothing(home: Path, server: tuple[str, Files]) -> None:
    with pytest.raises(UserError, match="sha256 mismatch"):
        install_from_catalog("tiny-bad")
    with pytest.raises(UserError, match="incomplete segmentation checkpoint"):
        install_from_catalog("tiny-wrong")
    models = home / "models"
    assert not (models / "tiny-bad").exists() and not (models / "tiny-wrong").exists()
    assert not any((models / ".downloads").iterdir())  # neither the file nor a .part is left


def test_download_converts_to_bundles(home: Path, server: tuple[str, Files], tmp_path: Path) -> None:
    from vocoslicer.models.installed import resolve

    _, files = server
    files.truncate_once.add("/tiny_omni.pt")
    with pytest.raises(UserError, match="interrupted"):
        install_from_catalog("tiny-omni")
    events = tmp_path / "events.jsonl"
    sink = EventSink(path=events)
    result = install_from_catalog("tiny-omni", sink)
    assert result["status"] == "installed" and result["sha256_verified"] and result["resumed_from"] > 0
    bundle = resolve("tiny-omni")
    assert bundle.task == "segmentation" and len(bundle.labels) == 20 and bundle.labels.by_value(6).name == "liver"
    model = bundle.build_model()  # strict: every tensor present
    assert model.out.conv.conv.weight.shape[0] == 21
    assert install_from_catalog("tiny-omni")["status"] == "already installed"
    ssl = install_from_catalog("tiny-ssl", sink)
    sink.close()
    assert not ssl["sha256_verified"]
    kinds = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(e["kind"] == "warning" and "could not be verified" in e["message"] for e in kinds)
    assert any(e["kind"] == "progress" for e in kinds)
    backbone = resolve("tiny-ssl")
    assert backbone.task == "backbone" and backbone.meta["weights_subset"] == "encoder"
    assert len(backbone.state_dict()) == 145
    assert backbone.meta["source"]["sha256_verified"] is False and len(backbone.meta["source"]["sha256"]) == 64


def test_models_cli_import_list_remove(home: Path, checkpoints: dict[str, bytes], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "my_vocomni.pt"
    ckpt.write_bytes(checkpoints["omni"])
    assert main(["models", "import", str(ckpt), "--id", "local-omni", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "installed" and out["task"] == "segmentation"
    bundle_dir = Path(out["path"])
    assert (bundle_dir / "labels.csv").is_file() and (bundle_dir / "weights.safetensors").is_file()
    # a bundle folder imports offline under a new version
    assert main(["models", "import", str(bundle_dir), "--version", "2.0.0"]) == 0
    import shutil

    zipped = shutil.make_archive(str(tmp_path / "bundle"), "zip", bundle_dir)
    assert main(["models", "import", zipped, "--version", "3.0.0"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {("local-omni", "1.0.0"), ("local-omni", "2.0.0"), ("local-omni", "3.0.0")} <= {(b["id"], b["version"])
                                                                   for b in listing["installed"]}
    assert any(e["id"] == "tiny-omni" and not e["installed"] for e in listing["catalog"])
    assert main(["models", "remove", "local-omni@1.0.0"]) == 0
    assert not bundle_dir.exists() and (bundle_dir.parent / "2.0.0").exists()
    bad = tmp_path / "broken.pt"
    bad.write_bytes(checkpoints["omni"][:1000])
    capsys.readouterr()
    assert main(["models", "import", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("vocoslicer: error: ") and "broken.pt" in err[0] and "Traceback" not in "".join(err)
    assert not (home / "models" / "broken").exists()
    assert main(["models", "remove", "nothing-here"]) == 2


def test_labels_must_match_head(home: Path, checkpoints: dict[str, bytes], tmp_path: Path) -> None:
    from vocoslicer.models.download import import_path

    ckpt = tmp_path / "omni.pt"
    ckpt.write_bytes(checkpoints["omni"])
    csv = tmp_path / "three.csv"
    csv.write_text("value,name\n1,a\n2,b\n3,c\n")
    with pytest.raises(UserError, match="21 output channels but the label table has 3"):
        import_path(ckpt, model_id="x", labels_csv=str(csv))
    assert not (home / "models" / "x").exists()
    args = infer_swin_args({"swinViT.patch_embed.proj.weight": torch.zeros(48, 1, 2, 2, 2)})
    assert args["size"] == "B" and "out_channels" not in args
