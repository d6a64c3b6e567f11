"""ONNX Runtime's quantisers on an exported graph.

* ``quantize_dynamic``: INT8 weights (per channel), activations quantised at run time
  (DynamicQuantizeLinear + MatMulInteger). The fastest INT8 on an ORT CPU target (DESIGN.md:
  ~22 ms vs 34 ms FP32) and the least accurate; ORT CPU only (TensorRT has no MatMulInteger).
* ``quantize_static``: INT8 QDQ with activation ranges calibrated on episodes. Symmetric
  (zero-point 0) for TensorRT, which requires it; unsigned asymmetric activations for ORT CPU.
* ``quantize_int4``: weight-only block-wise INT4 (MatMulNBits, an ORT contrib op).

Only MatMul/Gemm nodes whose second input is a constant weight are quantised unless attention is
asked for (static QDQ only): the activation x activation MatMuls of attention carried most of the
INT8 error measured here (DESIGN.md). Nodes of excluded torch modules stay FP32.

Weights for ONNX Runtime's CPU kernels are quantised with 7-bit range (``reduce_range``). On x86
CPUs without VNNI (AVX2, AVX-512 before Cascade Lake), ORT's u8 x s8 kernels multiply-add pairs
with ``vpmaddubsw``, which saturates at int16; with VNNI they do not. Full 8-bit weights therefore
gave a different, larger error on some x86 CPUs than on others (the tiny teacher's NMSE vs FP32:
~1e-5 here with VNNI, 3.4e-3 on a machine without it). With 7-bit weights no pair can saturate, so
the graph computes the same on every x86 CPU (measured: a 256x256 MatMul gave relative error
0.0168 both natively with VNNI and under ``qemu-x86_64 -cpu Haswell``, where full range gave 0.0116
and 0.0218). TensorRT has no such kernel, so its symmetric QDQ keeps the full range.

Never run this in a process that has run modelopt's ONNX quantiser: it patches ORT's quantiser
(DESIGN.md). modelopt's torch quantiser (``vlacompile.quantizers.modelopt``) does not.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vlacompile.errors import ConfigError
from vlacompile.quantizers import matches, node_module, unmatched

QUANTIZABLE = ("MatMul", "Gemm")


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def weight_matmuls(model) -> list[str]:
    """MatMul/Gemm nodes whose B input is a constant weight (an initializer)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in inits]


def attention_matmuls(model) -> list[str]:
    """MatMul nodes with no constant input: attention scores and the weighted sum of values."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in inits for i in n.input)]


def excluded_nodes(model, patterns: tuple[str, ...], source: str) -> tuple[list[str], list[str]]:
    """(names of the MatMul/Gemm nodes kept FP32, modules they belong to). A pattern matching no node
    of the graph is an error: a typo would quantise the layer it was meant to protect."""
    pairs = [(node_module(n.name), n.name) for n in model.graph.node]
    missing = unmatched(patterns, pairs)
    if missing:
        modules = sorted({m for m, _ in pairs if m})
        raise ConfigError(
            f"quantize.exclude names {missing}, which match no node of the exported graph",
            source=source,
            hint=f"name torch modules (e.g. {', '.join(modules[:6])}, ...) or substrings of ONNX node names",
        )
    names = [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and any(matches(node_module(n.name), p, n.name) for p in patterns)]
    return names, sorted({node_module(n) or n for n in names})


@contextmanager
def _quiet():
    """ORT's quantisers log a pre-processing suggestion and progress on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _finish(model, dst: Path, threshold_mb: float) -> list[Path]:
    from vlacompile.stages.export import save_onnx, strip_metadata

    strip_metadata(model)
    return save_onnx(model, dst, external_data_threshold_mb=threshold_mb)


def _has_external_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()


def quantize_dynamic(src: Path, dst: Path, *, exclude: tuple[str, ...], per_channel: bool, source: str, threshold_mb: float = 1024) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    model = _load(src)
    skip, excluded = excluded_nodes(model, exclude, source)
    todo = [n for n in weight_matmuls(model) if n not in skip]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        out = Path(tmp) / "q.onnx"
        ort_quantize_dynamic(
            model, out, op_types_to_quantize=list(QUANTIZABLE), per_channel=per_channel, weight_type=QuantType.QInt8,
            reduce_range=True,  # 7-bit weights: the same result on x86 CPUs with and without VNNI (module docstring)
            nodes_to_quantize=todo, use_external_data_format=_has_external_data(src),
            extra_options={"MatMulConstBOnly": True},
        )
        quantized = _load(out)
    _finish(quantized, dst, threshold_mb)
    return {"quantized_nodes": len(todo), "excluded": excluded}


def quantize_static(
    src: Path,
    dst: Path,
    *,
    calibration: dict[str, np.ndarray],
    exclude: tuple[str, ...],
    per_channel: bool,
    quantize_attention: bool,
    symmetric: bool,
    source: str,
    threshold_mb: float = 1024,
) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    model = _load(src)
    skip, excluded = excluded_nodes(model, exclude, source)
    candidates = weight_matmuls(model) + (attention_matmuls(model) if quantize_attention else [])
    todo = [n for n in candidates if n not in skip]
    first = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") else 1
    names = [i.name for i in model.graph.input]
    rows = len(next(iter(calibration.values())))
    n = rows // batch * batch
    feeds = [{k: calibration[k][i : i + batch] for k in names} for i in range(0, n, batch)]
    if not feeds:
        raise ConfigError(
            f"{rows} calibration observations do not fill one batch of the graph ({batch})",
            source=source,
            hint="raise quantize.calibration_samples (or pass more calibration episodes)",
        )

    class Reader(CalibrationDataReader):
        """One static batch of calibration inputs at a time."""

        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        out = Path(tmp) / "q.onnx"
        ort_quantize_static(
            model, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZABLE),
            per_channel=per_channel, weight_type=QuantType.QInt8,
            reduce_range=not symmetric,  # ORT CPU kernels: no int16 saturation without VNNI (module docstring)
            # TensorRT needs zero-point 0 (symmetric int8); ORT CPU's fastest kernels take u8 activations.
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            nodes_to_quantize=todo, calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_has_external_data(src),
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "MatMulConstBOnly": not quantize_attention},
        )
        quantized = _load(out)
    _finish(quantized, dst, threshold_mb)
    return {"quantized_nodes": len(todo), "excluded": excluded, "calibration_batches": len(feeds)}


def quantize_int4(src: Path, dst: Path, *, exclude: tuple[str, ...], block_size: int, source: str, threshold_mb: float = 1024) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _load(src)
    skip, excluded = excluded_nodes(model, exclude, source)
    # MatMulNBits replaces MatMul only; Gemm nodes (2-D linears) stay FP32.
    todo = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name in set(weight_matmuls(model)) and n.name not in skip]
    with _quiet():
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_exclude=skip, nodes_to_include=todo,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    _finish(quantizer.model.model, dst, threshold_mb)
    return {"quantized_nodes": len(todo), "excluded": excluded}
