"""Warm inference worker: JSON lines over stdin/stdout, models kept loaded between requests.

Starting Python, importing torch/MONAI and loading a model costs seconds; a Slicer session segments case after
case with the same model. ``vocoslicer serve --stdio`` pays that once. Protocol (one JSON object per line):

request  ``{"id": ..., "op": "segment"|"classify"|"ping"|"shutdown", "input": ..., "output": ..., "model": ...,
"device": ..., ["fast": bool, "overlap": float, "series": uid, "smooth": bool, "largest_component": bool,
"runtime": "auto"|"eager"|name, "uncertainty": bool, "uncertainty_map": path, "tta": "none"|"flip"]}``
A segment request without ``"model"`` uses the default model of ``vocoslicer segment`` (the bundled demo model).

replies  zero or more event lines (the :class:`~vocoslicer.jobs.events.EventSink` JSON form plus ``"id"``), then
exactly one final line ``{"id": ..., "kind": "result", ...}`` or ``{"id": ..., "kind": "error", "message": ...,
"code": 2}``. A bad request never stops the worker; ``shutdown`` (or end of input) does. stdout carries nothing
else: anything printed by libraries is redirected to stderr. Models are cached (least recently used first out)
by bundle folder + weights checksum + device, and GPU cache memory is released after every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import OrderedDict
from typing import IO, Any

from vocoslicer import __version__
from vocoslicer.errors import EXIT_CRASH, EXIT_USER, UserError, VoCoError
from vocoslicer.jobs.events import EventSink

OPS = ("segment", "classify", "ping", "shutdown")


_TEXT_FIELDS = ("input", "output", "model", "device", "series")
_BOOL_FIELDS = ("fast", "smooth", "largest_component")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_request(req: dict[str, Any]) -> None:
    """Field types of a request: text fields are strings, flags booleans, ``overlap`` a number in [0, 1)."""
    for name in _TEXT_FIELDS:
        if req.get(name) is not None and not isinstance(req[name], str):
            raise UserError(f"'{name}' must be a string, got {type(req[name]).__name__}")
    for name in _BOOL_FIELDS:
        if req.get(name) is not None and not isinstance(req[name], bool):
            raise UserError(f"'{name}' must be true or false, got {type(req[name]).__name__}")
    ov = req.get("overlap")
    if ov is not None and (isinstance(ov, bool) or not isinstance(ov, (int, float)) or not 0 <= ov < 1):
        raise UserError(f"overlap must be a number in [0, 1), got {ov!r}")
    if req.get("device"):
        from vocoslicer.commands._jobsetup import check_device

        check_device(req["device"], "device")


def load_bundle(spec: str | None) -> Any:
    """``installed.resolve`` with every failure of a broken bundle (bad JSON, missing keys) a user error."""
    from vocoslicer.models.installed import resolve

    try:
        return resolve(spec)
    except VoCoError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a broken model.json makes the loader raise
        raise UserError(f"{spec}: broken model bundle ({type(exc).__name__}: {_first(exc)[:200]})") from None


class ProtocolSink(EventSink):
    """Events of one request, tagged with its id, on the protocol stream."""

    def __init__(self, stream: IO[str], request_id: Any) -> None:
        super().__init__()
        self._streams.append(stream)
        self.request_id = request_id

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:  # noqa: D102 - see EventSink
        return super().emit(kind, id=self.request_id, **fields)

    def send(self, obj: dict[str, Any]) -> None:
        """Write a final (non-event) line."""
        line = json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)
        with self._lock:
            for s in self._streams:
                s.write(line + "\n")
                s.flush()


class ModelCache:
    """Loaded networks, least recently used evicted first; eviction frees the GPU memory they held."""

    def __init__(self, size: int = 2) -> None:
        self.size = max(1, int(size))
        self._models: OrderedDict[tuple[str, str, str], Any] = OrderedDict()

    @staticmethod
    def key(bundle: Any, device: Any) -> tuple[str, str, str]:
        """(bundle folder, weights checksum, device): a re-saved bundle at the same path is reloaded."""
        sha = str((bundle.meta.get("weights") or {}).get("sha256", ""))
        return str(bundle.path), sha, str(device)

    def get(self, bundle: Any, device: Any) -> tuple[Any, bool]:
        """Return ``(model, was_cached)``, building and loading it on ``device`` when needed."""
        from vocoslicer.infer.oom import release_device_memory
        from vocoslicer.infer.sliding import enable_fast_attention

        k = self.key(bundle, device)
        if k in self._models:
            self._models.move_to_end(k)
            return self._models[k], True
        if bundle.task == "classification":
            import vocoslicer.models.classifier  # noqa: F401 - registers the architecture
        model = bundle.build_model().to(device).eval()
        enable_fast_attention(model)
        self._models[k] = model
        while len(self._models) > self.size:
            _, old = self._models.popitem(last=False)
            del old
            release_device_memory()
        return model, False

    def keys(self) -> list[str]:
        """Human-readable cache content (for ``ping``)."""
        return [f"{p}@{d}" for p, _, d in self._models]


class Worker:
    """Serves requests from ``stdin`` on ``stdout`` until ``shutdown`` or end of input."""

    def __init__(self, stdin: IO[str], stdout: IO[str], device: str = "auto", cache_size: int = 2,
                 runtime: str = "auto") -> None:
        self.runtime = runtime  # default of requests that name none (compiled graphs stay loaded between cases)
        self.stdin = stdin
        self.stdout = stdout
        self.device = device
        self.cache = ModelCache(cache_size)
        self.served = 0

    def serve(self) -> int:
        """Main loop; returns the exit code."""
        for raw in self.stdin:
            line = raw.strip()
            if not line:
                continue
            if not self.handle_line(line):
                break
        return 0

    def handle_line(self, line: str) -> bool:
        """Answer one request line with exactly one final line; False when the worker should stop."""
        try:
            req = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, NaN/Infinity, nesting deeper than Python's
            message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
            if isinstance(exc, RecursionError):
                message = "nested too deeply"
            ProtocolSink(self.stdout, None).send({"id": None, "kind": "error", "code": EXIT_USER,
                                                  "message": f"request is not valid JSON ({message})"})
            return True
        rid = req.get("id") if isinstance(req, dict) else None
        if not (rid is None or isinstance(rid, (str, int, float))):  # NaN/inf are refused above
            rid = None
        sink = ProtocolSink(self.stdout, rid)
        if not isinstance(req, dict) or req.get("op") not in OPS:
            op = req.get("op") if isinstance(req, dict) else None
            if not isinstance(op, (str, int, float, bool, type(None))):
                op = type(op).__name__
            sink.send({"id": rid, "kind": "error", "code": EXIT_USER,
                       "message": f"unknown op {op!r} (expected one of {', '.join(OPS)})"})
            return True
        op = req["op"]
        t0 = time.perf_counter()
        final: dict[str, Any]
        try:
            check_request(req)
            with contextlib.redirect_stdout(sys.stderr):  # nothing but protocol lines on our stdout
                result = self.run_op(op, req, sink)
        except VoCoError as exc:
            final = {"id": rid, "kind": "error", "code": exc.exit_code, "message": _first(exc)}
        except Exception as exc:  # noqa: BLE001 - a worker survives a failed request
            final = {"id": rid, "kind": "error", "code": EXIT_CRASH,
                     "message": f"internal error: {type(exc).__name__}: {_first(exc)[:300]}"}
        else:
            self.served += 1
            final = {"id": rid, "kind": "result", "op": op, "seconds": round(time.perf_counter() - t0, 3),
                     **result}
        finally:
            self._release(req.get("device"))
        try:
            sink.send(final)
        except (TypeError, ValueError) as exc:  # a result that is not JSON (NaN): still one final line
            sink.send({"id": rid, "kind": "error", "code": EXIT_CRASH,
                       "message": f"internal error: unserialisable reply ({exc})"})
        return not (op == "shutdown" and final["kind"] == "result")

    def _release(self, device: Any) -> None:
        from vocoslicer.infer.oom import release_device_memory

        dev = device if isinstance(device, str) and device.strip().lower().startswith("cuda") else None
        with contextlib.suppress(Exception):  # freeing cache memory must never cost the worker its life
            release_device_memory(dev)

    def _model(self, bundle: Any, dev: Any) -> tuple[Any, bool]:
        """The cached network; weights that do not fit the architecture are the bundle's fault (exit 2)."""
        try:
            return self.cache.get(bundle, dev)
        except VoCoError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            if "out of memory" in str(exc).lower():
                raise
            raise UserError(f"{bundle.describe()}: cannot build the network from the bundle "
                            f"({type(exc).__name__}: {_first(exc)[:200]})") from None

    def _device(self, req: dict[str, Any]) -> Any:
        from vocoslicer.device import pick_device

        return pick_device(str(req.get("device") or self.device))

    def run_op(self, op: str, req: dict[str, Any], sink: ProtocolSink) -> dict[str, Any]:
        """Execute one request and return the fields of its result line."""
        if op == "ping":
            import torch

            return {"pid": os.getpid(), "version": __version__, "cuda": torch.cuda.is_available(),
                    "served": self.served, "cached_models": self.cache.keys()}
        if op == "shutdown":
            return {"served": self.served}
        # segment without "model" uses the default model, like `vocoslicer segment`; classify has no default
        for field in ("input", "output") if op == "segment" else ("input", "model"):
            if not req.get(field):
                raise UserError(f"{op} request needs '{field}'")
        if op == "segment":
            return self._segment(req, sink)
        return self._classify(req, sink)

    def _segment(self, req: dict[str, Any], sink: ProtocolSink) -> dict[str, Any]:
        from vocoslicer.infer.postprocess import keep_largest_component_image
        from vocoslicer.infer.preprocess import prepare
        from vocoslicer.infer.runtime import check_runtime
        from vocoslicer.infer.segment import FAST_SPACING, bundle_key, labels_csv_path
        from vocoslicer.infer.sliding import segment_prepared
        from vocoslicer.io import check_output_path, read_image, write_image

        dev = self._device(req)
        check_output_path(req["output"], inputs=[req["input"]], sidecars=[labels_csv_path(req["output"])])
        runtime = check_runtime(str(req.get("runtime") or self.runtime))
        bundle = load_bundle(req.get("model"))
        if bundle.task != "segmentation":
            raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a segmentation model")
        inf = bundle.inference
        try:
            overlap = float(inf["overlap"] if req.get("overlap") is None else req["overlap"])
        except (TypeError, ValueError):
            raise UserError(f"{bundle.describe()}: inference.overlap {inf['overlap']!r} is not a number") from None
        if not 0 <= overlap < 1:
            raise UserError(f"overlap must be in [0, 1), got {overlap}")
        img = read_image(req["input"], series_uid=req.get("series"))
        t_load = time.perf_counter()
        model, cached = self._model(bundle, dev)
        load_s = time.perf_counter() - t_load
        sink.progress(0, 3, stage="preprocessing")
        prepared = prepare(img, bundle.preprocessing, FAST_SPACING if req.get("fast") else None)
        for w in prepared.warnings:
            sink.warning(w)
        sink.progress(1, 3, stage=f"inference on {dev.type}")
        unc = None
        if req.get("uncertainty") or req.get("uncertainty_map") or req.get("tta", "none") != "none":
            from vocoslicer.infer.uncertainty import UncertaintyRequest, segment_prepared_uncertain, write_uncertainty

            unc = UncertaintyRequest(tta=str(req.get("tta") or "none"), map_path=req.get("uncertainty_map"))
            label = segment_prepared_uncertain(model, prepared.tensor, prepared.grid, img, bundle.channel_values,
                                               inf["roi_size"], overlap, str(inf["mode"]), int(inf["sw_batch_size"]),
                                               dev, unc, sink, smooth=req.get("smooth"),
                                               whole_volume=bool(req.get("fast")),
                                               names={lb.value: lb.name for lb in bundle.labels})
        else:
            label = segment_prepared(model, prepared.tensor, prepared.grid, img, bundle.channel_values,
                                     inf["roi_size"], overlap, str(inf["mode"]), int(inf["sw_batch_size"]), dev, sink,
                                     smooth=req.get("smooth"), whole_volume=bool(req.get("fast")), runtime=runtime,
                                     model_key=bundle_key(bundle))
        if req.get("largest_component"):
            label = keep_largest_component_image(label)
        sink.progress(3, 3, stage="writing")
        out = write_image(label, req["output"])
        csv_path = bundle.labels.write_csv(labels_csv_path(out))
        extra = {} if unc is None else write_uncertainty(unc, out, sink, input=str(req["input"]), model=bundle.id,
                                                         model_version=bundle.version)
        sink.artifact(out, "segmentation", labels=str(csv_path), model=bundle.id, model_version=bundle.version,
                      **extra)
        return {"output": str(out), "labels": str(csv_path), "model": bundle.describe(), "device": str(dev),
                "model_cached": cached, "model_load_seconds": round(load_s, 3), **extra}

    def _classify(self, req: dict[str, Any], sink: ProtocolSink) -> dict[str, Any]:
        from vocoslicer.infer.classify import OUTPUT_FORMATS, output_format, run_classify
        from vocoslicer.io import check_output_path

        dev = self._device(req)
        if req.get("output"):
            output_format(req["output"])
            check_output_path(req["output"], inputs=[req["input"]], extensions=OUTPUT_FORMATS)
        bundle = load_bundle(req["model"])
        if bundle.task != "classification":
            raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a classification model")
        t_load = time.perf_counter()
        model, cached = self._model(bundle, dev)
        load_s = time.perf_counter() - t_load
        result = run_classify(req["input"], req.get("output"), str(bundle.path), dev, req.get("series"), sink,
                              model=model)
        return {**result, "device": str(dev), "model_cached": cached, "model_load_seconds": round(load_s, 3)}


def serve_stdio(device: str = "auto", cache_size: int = 2, runtime: str = "auto", threads: int | None = None) -> int:
    """Run a worker on this process's stdin/stdout (``vocoslicer serve --stdio``)."""
    from vocoslicer.infer.runtime import apply_threads, check_runtime

    check_runtime(runtime)
    apply_threads(threads)
    stdout = sys.stdout
    # pay the heavy imports before the first request (that is the point of a warm worker)
    import monai.networks.nets  # noqa: F401
    import torch  # noqa: F401

    import vocoslicer.infer.preprocess  # noqa: F401
    import vocoslicer.infer.sliding  # noqa: F401
    import vocoslicer.models.classifier  # noqa: F401
    import vocoslicer.models.swin  # noqa: F401
    # line-buffered protocol output even when stdout is a pipe
    with contextlib.suppress(AttributeError, ValueError):
        stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    with contextlib.suppress(AttributeError, ValueError):  # a non-UTF-8 line is a bad request, not a dead worker
        sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    return Worker(sys.stdin, stdout, device, cache_size, runtime).serve()
