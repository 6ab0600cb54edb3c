"""backend/artifacts.py: reading and running exported ONNX/TorchScript files, and the FP16 verification tolerance."""

from __future__ import annotations

import copy

import torch


IMGSZ = 64  # smallest size with all three Detect grids (stride 32): keeps the file fast
FORMATS = ["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}


def test_half_tolerance_accepts_fp16_rounding_but_not_a_wrong_weight(backend, yolov5n):
    """FP16 artefacts (``export_options.half`` on CUDA) were refused on the first GPU run: box coordinates in pixels
    differ from the fp32 model by ~0.5 px. The fp16 forward of the real yolov5n stands in for the artefact here."""
    from yolo_prune_plugin.backend.artifacts import deterministic_input, output_mismatch, prepare_reference

    ref = prepare_reference(yolov5n, backend)
    im = deterministic_input((128, 128))
    with torch.no_grad():
        fp32 = ref(im)[0]
        half = copy.deepcopy(ref).half()
        fp16 = half(im.half())[0].float()
        half.model[0].conv.weight.mul_(1.1)  # one wrong layer, then rounded like the rest
        wrong = half(im.half())[0].float()
    assert "atol 0.001)" in output_mismatch(fp16, fp32, 1e-3)  # an absolute 1e-3 cannot hold fp16 rounding
    assert output_mismatch(fp16, fp32, 1e-3, half=True) == ""
    assert "x |output| for FP16" in output_mismatch(wrong, fp32, 1e-3, half=True)
    assert output_mismatch(fp32, fp32, 0.0) == ""
