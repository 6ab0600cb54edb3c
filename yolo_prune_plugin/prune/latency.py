"""What a channel costs in time: a per-layer latency table measured on the target runtime (HALP's lookup table,
Shen et al., NeurIPS 2022, on ONNX Runtime CPU), and from it the milliseconds one channel of each dependency
group costs.

Every Conv2d of the model is rebuilt alone as an ONNX graph (the convolution and YOLOv5's SiLU, the input shape
it sees at ``imgsz``) and timed at its width and with a quarter of its output or input channels fewer; the
slopes are milliseconds per output and per input channel. A group's channel then costs the output slope of each
member conv and the input slope of each consumer (:func:`channel_latency`). The table is measured once per model
architecture, input size, runtime and thread count and cached as JSON (``cache``: the run folder's
``latency_<imgsz>.json``); ``measured`` counts the timings a call really made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.nn as nn

#: untimed and timed runs per measurement (the median is kept); enough for a layer's few milliseconds
WARMUP, RUNS = 2, 9
#: the share of a layer's channels removed to read its slope
STEP = 0.25


def conv_inputs(model: nn.Module, imgsz: int) -> dict[str, tuple[int, int]]:
    """Each Conv2d's input height and width at ``imgsz`` (one forward pass of zeros)."""
    from .channel_groups import conv_sizes

    names = {m: n for n, m in model.named_modules()}
    return {names[m]: i for m, (i, _) in conv_sizes(model, imgsz).items()}


def _conv_graph(cin: int, cout: int, k: int, s: int, pad: int) -> bytes:
    """An ONNX graph of one convolution with bias and SiLU (x * sigmoid(x)), as YOLOv5's Conv exports fused."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4),
             helper.make_node("Sigmoid", ["c"], ["g"]), helper.make_node("Mul", ["c", "g"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def time_conv(cin: int, cout: int, k: int, s: int, pad: int, hw: tuple[int, int], threads: int = 1) -> float:
    """Median milliseconds of one convolution + SiLU on ONNX Runtime CPU (batch 1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(_conv_graph(cin, cout, k, s, pad), so, providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros((1, cin, *hw), np.float32)}
    for _ in range(WARMUP):
        sess.run(None, feed)
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * float(sorted(times)[len(times) // 2])


def latency_table(model: nn.Module, imgsz: int, threads: int = 1, cache: Optional[Path] = None,
                  names: Optional[list[str]] = None) -> dict[str, Any]:
    """``{"layers": {conv name: {"ms", "per_out", "per_in", "shape"}}, "measured": timings made}`` for every
    ungrouped Conv2d (or those in ``names``) at ``imgsz``. ``cache``: a JSON file read first and written after;
    an entry is reused when the conv's shape, input size and thread count match."""
    import onnxruntime as ort

    key_of = {"imgsz": imgsz, "threads": threads, "runtime": f"onnxruntime {ort.__version__}"}
    stored: dict[str, Any] = {}
    if cache is not None and Path(cache).is_file():
        try:
            data = json.loads(Path(cache).read_text())
            stored = data.get("layers", {}) if data.get("key") == key_of else {}
        except (OSError, ValueError):
            stored = {}
    hw = conv_inputs(model, imgsz)
    layers, measured = {}, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or name not in hw or (names is not None and name not in names):
            continue
        k, s, pad = m.kernel_size[0], m.stride[0], m.padding[0] if isinstance(m.padding, tuple) else 0
        shape = [m.in_channels, m.out_channels, k, s, pad, *hw[name]]
        if name in stored and stored[name].get("shape") == shape:
            layers[name] = stored[name]
            continue
        cin, cout = m.in_channels, m.out_channels
        full = time_conv(cin, cout, k, s, pad, hw[name], threads)
        d_out, d_in = max(1, round(cout * STEP)), max(1, round(cin * STEP))
        fewer_out = time_conv(cin, cout - d_out, k, s, pad, hw[name], threads) if cout > d_out else full
        fewer_in = time_conv(cin - d_in, cout, k, s, pad, hw[name], threads) if cin > d_in else full
        measured += 3
        layers[name] = {"ms": round(full, 4), "per_out": max(0.0, (full - fewer_out) / d_out),
                        "per_in": max(0.0, (full - fewer_in) / d_in), "shape": shape}
    if cache is not None and measured:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps({"key": key_of, "layers": {**stored, **layers}}, indent=1))
    return {"layers": layers, "measured": measured, "key": key_of}


def channel_latency(model: nn.Module, groups: list, dg: Any, table: dict[str, Any]) -> dict[str, float]:
    """Milliseconds one channel of each dependency group costs: the output slope of every member conv whose
    output channels go, the input slope of every consumer conv whose input channels go (a small floor keeps every
    group rankable)."""
    names = {m: n for n, m in model.named_modules()}
    layers = table["layers"]
    cost: dict[str, float] = {}
    for root, g in groups:
        seen, c = set(), 0.0
        for item in g:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Conv2d) or names.get(mod) not in layers:
                continue
            out = bool(dg.is_out_channel_pruning_fn(item.dep.handler))
            if (mod, out) in seen:
                continue
            seen.add((mod, out))
            row = layers[names[mod]]
            c += row["per_out"] if out else row["per_in"]
        cost[root] = max(c, 1e-6)
    return cost


__all__ = ["latency_table", "channel_latency", "conv_inputs", "time_conv"]
