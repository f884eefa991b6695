"""CPU inference runtimes: the network compiled by OpenVINO where that is installed, eager PyTorch otherwise.

Why OpenVINO: measured on this project's networks (benchmarks/RESULTS.md, "CPU runtimes (issue 17)"), one VoCo-B
64³ window ran 2.9x faster than eager PyTorch with SDPA attention (2.0x with f32 forced), where ONNX Runtime was
no faster than eager (1.0x; 3x slower in an earlier run) and ``torch.compile`` (inductor) compiled for 6 minutes
and then ran slower than eager. OpenVINO also picks the CPU's native precision itself: bf16 on CPUs with AMX /
AVX-512 bf16 units, f32 elsewhere (``openvino-f32`` forces f32 everywhere).

How it plugs in: :func:`runtime_model` wraps the eager network in a :class:`RuntimeModule` that the sliding-window
code calls like any ``nn.Module``. On the first window of a new shape the network is exported for exactly that
shape (SwinUNETR's padding and window sizes are Python decisions baked in at export) and the graph is cached on
disk under ``<home>/cache/runtime``, keyed by the weights' sha256, the shape and the library versions, so the
export is paid once per bundle and window shape; compiled graphs are also kept in memory (the warm worker reuses
them). Any failure of the runtime (not installed, export or inference raising) becomes one warning event and the
eager network answers instead: a faster path must never turn a working segmentation into an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink

CompiledFn = Callable[[np.ndarray], np.ndarray]
AUTO_ORDER = ("openvino",)
"""Runtimes ``auto`` tries, fastest first (by the issue-17 measurements)."""
AUTO_MIN_PARAMS = 10_000_000
"""``auto`` keeps small networks eager: the 4 M-parameter demo network ran no faster under OpenVINO (both ~0.6 s
per 64³ window), so its export would be pure cost; VoCo-B (62 M) and nnU-Net-sized UNets (~30 M) gain."""
MAX_WINDOW_VOXELS = 96**3
"""Larger windows run eager: one 128³ VoCo-B window peaked at 7.2 GB RSS under OpenVINO (3.6 GB eager; the
shifted-window attention masks and scores are materialised there) for a 1.6x gain, and took minutes to export.
With a runtime, ``--fast`` therefore tiles with windows up to this size instead of one whole-volume window."""


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else every core this process may run on (Slicer users have 8-32)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_threads`); the runtimes use the same number."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(n)
    return n


class OpenVINOBackend:
    """OpenVINO on the CPU: graph converted from the PyTorch module, saved as IR (``model.xml`` + ``model.bin``)."""

    def __init__(self, name: str, precision: str | None) -> None:
        self.name = name
        self.precision = precision  # None: the device's native choice (bf16 on AMX CPUs)

    def missing(self) -> str | None:
        """Why this runtime cannot be used here (``None``: it can)."""
        if importlib.util.find_spec("openvino") is None:
            return "the openvino package is not installed (pip install 'vocoslicer[cpu-fast]')"
        return None

    def version(self) -> str:
        """Part of the cache key: a new OpenVINO re-exports instead of trusting an old IR."""
        import openvino as ov

        return str(ov.__version__)

    def export(self, model: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
        """Write the IR for ``example``'s shape into ``folder``."""
        import openvino as ov

        om = ov.convert_model(model, example_input=example)
        ov.save_model(om, str(folder / "model.xml"), compress_to_fp16=False)

    def load(self, folder: Path, threads: int) -> CompiledFn:
        """Compile the cached IR for the CPU with ``threads`` threads."""
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        core = ov.Core()
        # OpenVINO's own blob cache: compiling a VoCo-B graph takes minutes, loading the blob seconds
        core.set_property({"CACHE_DIR": str(folder / "compiled")})
        compiled = core.compile_model(str(folder / "model.xml"), "CPU", config)
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            return np.array(request.infer({0: x})[0], copy=True)  # the request reuses its output buffer

        return run


BACKENDS: dict[str, Any] = {"openvino": OpenVINOBackend("openvino", None),
                            "openvino-f32": OpenVINOBackend("openvino-f32", "f32")}
"""Named runtimes besides ``eager`` (tests register failing ones here)."""


def runtime_choices() -> tuple[str, ...]:
    """Values ``--runtime`` accepts."""
    return ("auto", "eager", *BACKENDS)


def check_runtime(name: str) -> str:
    """Validate a ``--runtime`` value (one-line user error for a typo)."""
    if name not in runtime_choices():
        raise UserError(f"unknown runtime {name!r} (choose one of {', '.join(runtime_choices())})")
    return name


def pick_runtime(name: str, device: torch.device, events: EventSink = NULL_SINK) -> str:
    """``auto`` → the fastest installed runtime on the CPU, eager on a GPU; a named runtime that cannot run here
    → eager with a warning event."""
    check_runtime(name)
    if name == "eager":
        return "eager"
    if device.type != "cpu":
        if name != "auto":
            events.warning(f"runtime {name} runs on the CPU only: using eager PyTorch on {device.type}")
        return "eager"
    candidates = AUTO_ORDER if name == "auto" else (name,)
    reasons = []
    for cand in candidates:
        why = BACKENDS[cand].missing()
        if why is None:
            return cand
        reasons.append(f"{cand}: {why}")
    events.warning(f"no fast CPU runtime ({'; '.join(reasons)}): using eager PyTorch")
    return "eager"


def state_key(model: torch.nn.Module) -> str:
    """sha256 of the weights, for models without a bundle checksum (hashing is cheap next to an export)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_root() -> Path:
    from vocoslicer.paths import cache_dir

    return cache_dir() / "runtime"


def graph_folder(backend: Any, model: torch.nn.Module, model_key: str, shape: tuple[int, ...]) -> Path:
    """Cache folder of one exported graph: bundle sha256 × input shape × runtime/torch/MONAI versions × attention."""
    import monai

    sdpa = any(getattr(m, "use_flash_attention", False) for m in model.modules())
    parts = [model_key, type(model).__qualname__, "x".join(map(str, shape)), backend.version(), torch.__version__,
             monai.__version__, f"sdpa={sdpa}"]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    return _cache_root() / backend.name / digest


def export_cached(backend: Any, model: torch.nn.Module, model_key: str, shape: tuple[int, ...],
                  events: EventSink = NULL_SINK) -> tuple[Path, bool]:
    """The graph folder for ``shape``, exported now unless cached; returns ``(folder, exported_now)``.

    The export goes to a temporary folder next to the cache entry which is then renamed into place: a crash
    leaves no half-written graph, and two processes exporting at once both succeed (the second rename loses).
    """
    folder = graph_folder(backend, model, model_key, shape)
    if (folder / "done.json").is_file():
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    events.log(f"{backend.name}: exporting the network for input {'x'.join(map(str, shape))} (once; cached in "
               f"{folder.parent})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with torch.inference_mode(False), torch.no_grad():
            backend.export(model, torch.zeros(shape, dtype=torch.float32), tmp)
        (tmp / "done.json").write_text(json.dumps({"shape": list(shape), "model": model_key,
                                                   "runtime": backend.name, "version": backend.version()}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its graph
            if not (folder / "done.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


_LOADED: OrderedDict[tuple[str, int], CompiledFn] = OrderedDict()
_LOADED_MAX = 4  # compiled graphs kept in memory (warm worker: same bundle and shape case after case)
EXPORTS = {"count": 0}  # exports done by this process (tests pin the cache reuse on it)


def compiled_for(backend: Any, model: torch.nn.Module, model_key: str, shape: tuple[int, ...], threads: int,
                 events: EventSink = NULL_SINK) -> CompiledFn:
    """A callable running ``model`` on arrays of ``shape``: from memory, from the disk cache, or exported now."""
    folder = graph_folder(backend, model, model_key, shape)
    key = (str(folder), int(threads))
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    folder, exported = export_cached(backend, model, model_key, shape, events)
    EXPORTS["count"] += int(exported)
    fn = backend.load(folder, threads)
    _LOADED[key] = fn
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return fn


class RuntimeModule(torch.nn.Module):
    """The eager network behind a compiled graph; one window at a time (batching brings no speed on a CPU).

    The first failure of the runtime (export, compile or inference) emits one warning event and every later call
    goes to the eager network: the segmentation still finishes, with the answers PyTorch gives.
    """

    def __init__(self, eager: torch.nn.Module, backend: Any, model_key: str, threads: int,
                 events: EventSink = NULL_SINK) -> None:
        super().__init__()
        self.eager = eager
        self.backend = backend
        self.model_key = model_key
        self.threads = int(threads)
        self.events = events
        self.failed: str | None = None

    @property
    def runtime(self) -> str:
        """The runtime answering now (``eager`` after a failure)."""
        return "eager" if self.failed else self.backend.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        if self.failed is None and x.device.type == "cpu" and x[0].numel() <= MAX_WINDOW_VOXELS * x.shape[1]:
            try:
                fn = compiled_for(self.backend, self.eager, self.model_key, (1, *x.shape[1:]), self.threads,
                                  self.events)
                outs = [fn(np.ascontiguousarray(x[i:i + 1].float().numpy())) for i in range(x.shape[0])]
                return torch.from_numpy(np.concatenate(outs, axis=0))
            except Exception as exc:  # noqa: BLE001 - any runtime failure falls back to eager
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self.events.warning(f"{self.backend.name} runtime failed ({self.failed}): using eager PyTorch")
        return self.eager(x)


def will_compile(model: torch.nn.Module, device: torch.device, runtime: str) -> bool:
    """Whether :func:`runtime_model` would put a compiled runtime in front of ``model`` (no events, no export)."""
    if runtime == "auto" and sum(p.numel() for p in model.parameters()) < AUTO_MIN_PARAMS:
        return False
    return pick_runtime(runtime, torch.device(device)) != "eager"


def runtime_model(model: torch.nn.Module, device: torch.device, runtime: str = "eager",
                  model_key: str | None = None, threads: int | None = None,
                  events: EventSink = NULL_SINK) -> torch.nn.Module:
    """What the sliding-window code calls: ``model`` itself (eager) or a :class:`RuntimeModule` around it.

    ``auto`` leaves networks under :data:`AUTO_MIN_PARAMS` parameters eager (nothing to gain, an export to pay).

    ``model_key`` is the bundle's weights sha256 (``None``: hashed from the weights); ``threads`` defaults to
    torch's current intra-op thread count (set by :func:`apply_threads`).
    """
    if runtime == "auto" and sum(p.numel() for p in model.parameters()) < AUTO_MIN_PARAMS:
        return model
    name = pick_runtime(runtime, torch.device(device), events)
    if name == "eager":
        return model
    n = torch.get_num_threads() if threads is None else int(threads)
    with contextlib.suppress(Exception):
        model.eval()
    return RuntimeModule(model, BACKENDS[name], model_key or state_key(model), n, events).eval()
