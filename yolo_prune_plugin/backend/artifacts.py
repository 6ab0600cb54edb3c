"""Reading and running exported files (ONNX, TorchScript): their Conv2d weights, sizes and outputs.

:func:`verify_artifact` checks that an exported file keeps the pruned zeros (or the pruned channels) and
gives the outputs of the ``.pt`` it came from.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, ExportError
from .loading import Backend, get_backend, load_checkpoint, respell_trusted

LOGGER = logging.getLogger("yolo_prune_plugin")


#: Formats this module exports *and* verifies, mapped to YOLOv5's artefact suffix.
SUPPORTED_FORMATS: dict[str, str] = {"torchscript": ".torchscript", "onnx": ".onnx"}


#: Seed of the deterministic input image used to compare outputs.
INPUT_SEED = 0


# --------------------------------------------------------------------------------------------------
# Loading the model YOLOv5 exports
# --------------------------------------------------------------------------------------------------
def _fuse(model: nn.Module) -> nn.Module:
    if hasattr(model, "fuse") and any(hasattr(m, "bn") and hasattr(m, "conv") for m in model.modules()):
        model.fuse()
    return model


def load_export_model(weights: str | Path, device: Any = "cpu", backend: Optional[Backend] = None) -> nn.Module:
    """Load ``weights`` through the plugin's safe loader the way ``export.run`` takes it (``ema`` before ``model``,
    fp32, eval), BatchNorm fused. Raises :class:`CheckpointError` for a missing, unsafe or non-YOLOv5 file."""
    b = backend or get_backend()
    ckpt = load_checkpoint(weights, b)
    model = (ckpt.get("ema") or ckpt["model"]).float().to(device)
    respell_trusted(model, b)
    return _fuse(model).eval()


def prepare_reference(model: nn.Module, backend: Optional[Backend] = None) -> nn.Module:
    """A fused, eval, fp32, CPU copy of an in-memory pruned model (the original is not modified)."""
    b = backend or get_backend()
    ref = copy.deepcopy(model).float().cpu()
    respell_trusted(ref, b)
    return _fuse(ref).eval()


@dataclass
class ArtifactReport:
    """The outcome of exporting and verifying one format.

    ``conv_weights``/``zeros``: Conv weight elements the artefact carries and how many are exactly zero;
    ``expected_zeros``/``expected_conv_weights``: the same counts for the pruned model as exported (fused);
    ``bytes``/``gzip_bytes``: artefact size on disk and after gzip (level 6), where unstructured zeros pay off;
    ``max_abs_diff``: largest absolute difference of the predictions (pixels / scores) from the ``.pt`` model;
    ``written``: whether the artefact was moved into ``path`` (only verified artefacts are); ``path`` is the
    destination either way, so for a failed format it names a file that was not (re)written.
    """

    format: str
    path: Optional[str]
    ok: bool
    message: str
    bytes: Optional[int] = None
    gzip_bytes: Optional[int] = None
    conv_layers: Optional[int] = None
    conv_weights: Optional[int] = None
    zeros: Optional[int] = None
    expected_conv_weights: Optional[int] = None
    expected_zeros: Optional[int] = None
    max_abs_diff: Optional[float] = None
    atol: Optional[float] = None
    written: bool = False

    @property
    def sparsity(self) -> Optional[float]:
        """Fraction of the artefact's Conv weights that are exactly zero."""
        return self.zeros / self.conv_weights if self.zeros is not None and self.conv_weights else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = None if self.sparsity is None else round(self.sparsity, 6)
        return d


# --------------------------------------------------------------------------------------------------
# Reading artefacts back
# --------------------------------------------------------------------------------------------------
def _onnx_conv_weights(path: Path) -> list[np.ndarray]:
    """Weight tensors feeding ``Conv`` nodes of an ONNX graph (initializers or ``Constant`` nodes).

    Only a Conv node's second input (``W``) is read: biases (third input), Detect's anchors and grids (constants of
    ``Mul``/``Add`` nodes) and everything else are not Conv weights and are excluded. ``Identity``/``Cast`` between
    a constant and the Conv are followed. A weight that cannot be resolved to a constant raises ExportError.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    consts: dict[str, Any] = {t.name: t for t in graph.initializer}
    producers = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    weights = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        while name not in consts and name in producers and producers[name].op_type in {"Identity", "Cast"}:
            name = producers[name].input[0]
        if name not in consts:
            raise ExportError(f"{path}: Conv node {node.name or node.output[0]} takes its weight from "
                              f"'{node.input[1]}', which is not a constant; cannot count its zeros")
        weights.append(numpy_helper.to_array(consts[name]))
    return weights


def _torchscript_conv_weights(module: torch.jit.ScriptModule) -> list[torch.Tensor]:
    """Weights of the ``Conv2d`` submodules a TorchScript module carries (by their ``original_name``).

    Only each Conv2d's ``weight`` is read: its bias, any BatchNorm parameters/buffers left in the file and
    Detect's anchors/grids are excluded.
    """
    return [sub.weight.detach() for _, sub in module.named_modules()
            if getattr(sub, "original_name", None) == "Conv2d" and hasattr(sub, "weight")]


def conv_weights_of(model: nn.Module) -> list[torch.Tensor]:
    """Weights of every ``nn.Conv2d`` of an in-memory model (biases, BatchNorms, anchors excluded)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]


def _count(weights: Sequence[Any]) -> tuple[int, int]:
    total = zeros = 0
    for w in weights:
        a = w.cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        total += int(a.size)
        zeros += int(a.size - np.count_nonzero(a))
    return total, zeros


def file_sizes(path: str | Path, level: int = 6) -> tuple[int, int]:
    """(bytes, gzip bytes) of a file, or of all files of a directory artefact; gzip at ``level`` (gzip's default 6)."""
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    raw = packed = 0
    for f in files:
        raw += f.stat().st_size
        counter = _CountingWriter()
        with f.open("rb") as src, gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=level, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        packed += counter.n
    return raw, packed


class _CountingWriter:
    """A write-only file object that only counts bytes."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _format_of(path: Path) -> str:
    for f, suffix in SUPPORTED_FORMATS.items():
        if path.name.endswith(suffix):
            return f
    raise ConfigError(f"{path}: cannot tell the format from the name (expected a file ending in "
                      f"{', '.join(SUPPORTED_FORMATS.values())})")


def _artifact_input_shape(path: Path, fmt: str) -> Optional[tuple[int, int]]:
    """(height, width) the artefact was exported for, when it is fixed."""
    try:
        if fmt == "onnx":
            import onnx

            dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
                return int(dims[2].dim_value), int(dims[3].dim_value)
        elif fmt == "torchscript":
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("extra/config.txt")), None)
                if name:
                    shape = json.loads(z.read(name))["shape"]
                    return int(shape[2]), int(shape[3])
    except Exception:  # noqa: BLE001 - fall back to the imgsz given
        return None
    return None


def deterministic_input(hw: tuple[int, int], seed: int = INPUT_SEED) -> torch.Tensor:
    """A fixed pseudo-random BCHW image in [0, 1) (the same on every machine for a given seed and size)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *hw, generator=g)


def _first_output(y: Any) -> torch.Tensor:
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))


def _torch_device(device: str) -> torch.device:
    d = str(device).strip().lower().replace("cuda:", "")
    if d in {"", "cpu"} or not torch.cuda.is_available():
        return torch.device("cpu")
    first = d.split(",")[0]
    return torch.device(f"cuda:{first}" if first.isdigit() else "cuda")


def _run_artifact(path: Path, fmt: str, im: torch.Tensor, device: str) -> torch.Tensor:
    """The artefact's first output for ``im`` (onnxruntime on CUDA when asked and available, else CPU)."""
    dev = _torch_device(device)
    if fmt == "onnx":
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        sess = ort.InferenceSession(str(path), providers=providers)
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        out = sess.run(None, {inp.name: im.numpy().astype(dtype)})
        return torch.from_numpy(np.asarray(out[0])).float()
    ts = torch.jit.load(str(path), map_location=dev)
    ts.eval()
    dtype = next((p.dtype for p in ts.parameters()), torch.float32)
    with torch.no_grad():
        y = ts(im.to(dev, dtype))
    return _first_output(y).float().cpu()


#: FP16 artefacts: allowed relative output difference on top of ``atol`` (measured: yolov5n at 320, fp16 vs fp32,
#: worst element 0.76 px at 151 px, i.e. 0.5 %; a wrong weight moves outputs by tens of per cent).
HALF_RTOL = 0.02


def output_mismatch(got: torch.Tensor, expected: torch.Tensor, atol: float, half: bool = False) -> str:
    """``""`` when every output is within ``atol`` (plus :data:`HALF_RTOL` of its value for an FP16 artefact) of
    the pruned model's, else the message that says by how much it is not."""
    diff = (got.float() - expected.float()).abs()
    tol = atol + (HALF_RTOL * expected.float().abs() if half else 0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    if np.isfinite(worst) and bool((diff <= tol).all()):
        return ""
    return (f"outputs differ by up to {worst:.3g} (atol {atol:g}" + (f" + {HALF_RTOL:g} x |output| for FP16)"
                                                                     if half else ")"))


def verify_artifact(path: str | Path, pruned_model: nn.Module | str | Path, imgsz: int | Sequence[int] = 640,
                    atol: float = 1e-3, fmt: Optional[str] = None, device: str = "cpu",
                    backend: Optional[Backend] = None, _cache: Optional[dict] = None) -> ArtifactReport:
    """Check that an exported artefact carries the pruned model's zeros and reproduces its outputs.

    ``pruned_model`` is the pruned checkpoint path or an in-memory model; it is compared fused, eval and fp32
    (a copy is used). The expected zeros are counted on the *fused* Conv weights: fusion multiplies each output
    channel by gamma/sigma, which keeps every zero and only adds one where gamma is 0. If the artefact stores
    FP16 weights, the expected count is taken after the same FP16 cast (tiny weights can underflow to zero).
    Only Conv *weights* are counted. In ONNX that is the second input (``W``) of each ``Conv`` node, resolved
    to its initializer/``Constant``; Conv biases (third input), Detect's anchors and grids (constants feeding
    ``Mul``/``Add``) and any other initializer are not. In TorchScript it is the ``weight`` of each submodule
    whose ``original_name`` is ``Conv2d``; biases, BatchNorm parameters/buffers and Detect buffers are not. On the
    pruned model it is ``weight`` of every ``nn.Conv2d`` after fusion. Both sides must also agree on the number
    of Conv layers and Conv weights, so a missing or extra layer fails too.
    FP16 artefacts (``half``) differ from the fp32 model by far more than 1e-3 (box coordinates in pixels keep
    about three significant digits): for them each output may also differ by :data:`HALF_RTOL` of its value.
    ``imgsz`` is used only when the artefact's input size is not fixed (dynamic ONNX).

    Returns a report with ``ok=False`` and a message when the counts differ or an output differs by more than
    ``atol``; raises :class:`ExportError` when the artefact cannot be read at all.
    """
    b = backend or get_backend()
    path = Path(path)
    fmt = fmt or _format_of(path)
    if fmt not in SUPPORTED_FORMATS:
        raise ConfigError(f"verify format '{fmt}': expected one of {', '.join(SUPPORTED_FORMATS)}")
    if _cache is not None and "model" in _cache:  # export_and_verify: already loaded, fused and on the CPU
        ref = _cache["model"]
    elif isinstance(pruned_model, (str, Path)):
        ref = load_export_model(pruned_model, "cpu", b)
    else:
        ref = prepare_reference(pruned_model, b)
    raw, packed = file_sizes(path)
    report = ArtifactReport(format=fmt, path=str(path), ok=False, message="", bytes=raw, gzip_bytes=packed,
                            atol=float(atol))
    try:
        if fmt == "onnx":
            got = _onnx_conv_weights(path)
        else:
            got = _torchscript_conv_weights(torch.jit.load(str(path), map_location="cpu"))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: cannot read the exported {fmt} model ({type(e).__name__}: {e})") from None
    half = any(getattr(w, "dtype", None) in (torch.float16, np.float16) for w in got)
    ref_w = conv_weights_of(ref)
    report.conv_layers = len(got)
    report.conv_weights, report.zeros = _count(got)
    report.expected_conv_weights, report.expected_zeros = _count([w.half() if half else w for w in ref_w])

    hw = _artifact_input_shape(path, fmt)
    if hw is None:
        sizes = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz, imgsz]
        gs = int(max(getattr(ref, "stride", torch.tensor([32.0]))))
        hw = tuple(int(b.general.check_img_size(int(s), gs)) for s in sizes[:2])  # type: ignore[assignment]
    im = deterministic_input(hw)  # type: ignore[arg-type]
    cache = _cache if _cache is not None else {}
    if hw not in cache:
        with torch.no_grad():
            cache[hw] = _first_output(ref(im)).float()
    expected = cache[hw]
    try:
        got_out = _run_artifact(path, fmt, im, device)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: cannot run the exported {fmt} model ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None

    problems = []
    if len(got) != len(ref_w) or report.conv_weights != report.expected_conv_weights:
        problems.append(f"carries {len(got)} Conv layers / {report.conv_weights} weights, the pruned model "
                        f"{len(ref_w)} / {report.expected_conv_weights}")
    if report.zeros != report.expected_zeros:
        problems.append(f"zeros did not survive: {report.zeros} zero Conv weights, expected "
                        f"{report.expected_zeros}")
    if tuple(got_out.shape) != tuple(expected.shape):
        problems.append(f"output shape {tuple(got_out.shape)} != {tuple(expected.shape)}")
    else:
        report.max_abs_diff = float((got_out - expected).abs().max())
        problem = output_mismatch(got_out, expected, atol, half)
        if problem:
            problems.append(problem)
    report.ok = not problems
    sp = report.sparsity or 0.0
    report.message = ("; ".join(problems) if problems else
                      f"ok: {report.zeros}/{report.conv_weights} Conv weights zero ({sp:.1%}), "
                      f"max |diff| {report.max_abs_diff:.2g}")
    return report
