"""Static TensorRT-readiness check of an ONNX graph: pure onnx, runs on any machine.

What a TensorRT build on the device would reject, or silently run at the wrong precision, found
before the artifact leaves the build machine:

* ops   every node's op is one TensorRT's ONNX parser imports (onnx-tensorrt's operator support
        matrix, docs/operators.md for TensorRT 10.15), or a ``trt::`` op modelopt writes for
        FP8 / INT4 / NVFP4 / MXFP8 that the target's TensorRT version has;
* shapes every graph input and output has static dimensions (the engine profile fixes them);
* qdq   every Q/DQ pair feeds a MatMul/Gemm/Conv (through Transpose/Reshape at most): a pair in
        front of a Softmax, LayerNormalization or Add only adds a float round trip; a matmul with
        one quantised input and one float input cannot use an integer kernel (weight-only INT4
        blocks excepted); a QuantizeLinear is followed by a DequantizeLinear; zero points are zero
        (TensorRT's parser requires symmetric quantisation);
* opset the default-domain opset lies in the range the target's TensorRT parser documents;
* constants every float constant is finite in the reduced precisions an engine for the target may
        run in (FP16, BF16): a value beyond their range (float32's lowest as a masked-attention
        fill, say) becomes -inf there, and a fully masked softmax row then gives NaN (an FP16
        pi0.5 engine on Thor measured cosine -0.55 against torch). Constants stored as external
        data (large weights) are not read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlacompile.errors import ConfigError
from vlacompile.stages.export import const_tensors
from vlacompile.trt import ReadinessError

# onnx-tensorrt docs/operators.md (TensorRT 10.15), the operators marked "Y".
SUPPORTED_OPS = frozenset(
    ["Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "STFT", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"]
)
# Opset 23/24 operators, documented from TensorRT 10.15 on.
NEWER_OPS = {"Attention": (10, 15), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15), "TensorScatter": (10, 15)}
# modelopt's torch exporter writes these ``trt::`` ops (modelopt/torch/quantization/export_onnx.py);
# first TensorRT version whose parser imports them. FP4 and MXFP8 need Blackwell-era TensorRT.
TRT_DOMAIN_OPS = {
    "TRT_FP8QuantizeLinear": (10, 0),
    "TRT_FP8DequantizeLinear": (10, 0),
    "DequantizeLinear": (10, 0),  # blocked INT4 weights (INT4-AWQ)
    "TRT_FP4QDQ": (10, 8),
    "TRT_FP4DynamicQuantize": (10, 8),
    "TRT_MXFP8DequantizeLinear": (10, 11),
    "TRT_MXFP8DynamicQuantize": (10, 11),
}
# Parser opset range by TensorRT version: the ranges onnx-tensorrt documents (10.0: 9-20; 10.15:
# 9-24; 11.x: up to 25). Versions in between get the lower documented bound: a false alarm on a
# new opset is cheaper than an engine build that fails on the device.
OPSET_RANGES = [((10, 0), (9, 20)), ((10, 15), (9, 24)), ((11, 0), (9, 25))]

Q_OPS = {("", "QuantizeLinear"), ("trt", "TRT_FP8QuantizeLinear"), ("trt", "TRT_FP4DynamicQuantize"), ("trt", "TRT_MXFP8DynamicQuantize")}
DQ_OPS = {("", "DequantizeLinear"), ("trt", "DequantizeLinear"), ("trt", "TRT_FP8DequantizeLinear"), ("trt", "TRT_MXFP8DequantizeLinear"), ("trt", "TRT_FP4QDQ")}
# Layout ops TensorRT's Q/DQ fusion propagates through.
TRANSPARENT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
QUANTIZABLE = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
INT4_TYPES = {21, 22}  # TensorProto.UINT4, TensorProto.INT4
MAX_NAMES = 8  # node names quoted per problem in the error message
# The largest finite value of each reduced float precision a TensorRT engine runs layers in.
REDUCED_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}


def parse_version(text: str) -> tuple[int, int]:
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ConfigError(f"TensorRT version {text!r} is not MAJOR.MINOR", source="target device.tensorrt") from None


def opset_range(version: tuple[int, int]) -> tuple[int, int]:
    if version < OPSET_RANGES[0][0]:
        raise ConfigError(
            f"TensorRT {version[0]}.{version[1]} is older than 10.0, which vlacompile does not target",
            source="target device.tensorrt",
            hint="use JetPack 6+ (TensorRT 10) on the device",
        )
    return [r for v, r in OPSET_RANGES if version >= v][-1]


def _domain(node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _name(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _all_nodes(graph):
    """Nodes of the graph and of its If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _check_ops(graph, version: tuple[int, int]) -> list[str]:
    bad = []
    for i, n in enumerate(_all_nodes(graph)):
        dom = _domain(n)
        if dom == "":
            need = NEWER_OPS.get(n.op_type)
            ok = n.op_type in SUPPORTED_OPS or (need is not None and version >= need)
        elif dom == "trt":
            need = TRT_DOMAIN_OPS.get(n.op_type)
            ok = need is not None and version >= need
        else:
            ok = False
        if not ok:
            bad.append(f"{_name(n, i)} ({dom + '::' if dom else ''}{n.op_type})")
    return bad


def _check_shapes(graph) -> list[str]:
    bad = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        inits = {i.name for i in graph.initializer}
        for v in values:
            if v.name in inits:  # old-style graphs list initializers as inputs
                continue
            t = v.type.tensor_type
            if not t.HasField("shape"):
                bad.append(f"{kind} {v.name!r} has no shape")
                continue
            for axis, d in enumerate(t.shape.dim):
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    what = f"symbolic {d.dim_param!r}" if d.dim_param else "unknown"
                    bad.append(f"{kind} {v.name!r} dim {axis} is {what}")
    return bad


def _check_qdq(graph) -> tuple[dict[str, list[str]], dict[str, int]]:
    from onnx import numpy_helper

    producer: dict[str, tuple[int, Any]] = {}
    consumers: dict[str, list[tuple[int, Any]]] = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            producer[o] = (i, n)
        for x in n.input:
            consumers.setdefault(x, []).append((i, n))
    consts = const_tensors(graph)
    outputs = {o.name for o in graph.output}
    key = lambda n: (_domain(n), n.op_type)

    def terminals(value: str) -> list[tuple[int, Any]]:
        """The first non-layout consumers of ``value`` (following Transpose/Reshape and chained DQs)."""
        found = []
        for i, c in consumers.get(value, []):
            if c.op_type in TRANSPARENT or key(c) in DQ_OPS:
                found += terminals(c.output[0])
            else:
                found.append((i, c))
        return found

    def source(value: str):
        """The producer of ``value`` behind layout ops (None for graph inputs and initializers)."""
        while value in producer:
            _, p = producer[value]
            if p.op_type not in TRANSPARENT:
                return p
            value = p.input[0]
        return None

    def weight_only(dq) -> bool:
        block = next((a.i for a in dq.attribute if a.name == "block_size"), 0)
        w = consts.get(dq.input[0])
        return block > 0 or key(dq) == ("trt", "DequantizeLinear") or (w is not None and w.data_type in INT4_TYPES)

    problems: dict[str, list[str]] = {"not_feeding_matmul": [], "half_quantized": [], "q_without_dq": [], "nonzero_zero_point": []}
    stats = {"qdq_pairs": 0, "quantized_layers": 0, "weight_only_layers": 0}
    for i, n in enumerate(graph.node):
        k = key(n)
        if k in Q_OPS:
            bad = [c for _, c in consumers.get(n.output[0], []) if key(c) not in DQ_OPS]
            if bad or n.output[0] in outputs:
                problems["q_without_dq"].append(f"{_name(n, i)} -> {', '.join(c.name or c.op_type for c in bad) or 'graph output'}")
        if k not in DQ_OPS:
            continue
        if k == ("", "DequantizeLinear"):
            zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is not None and numpy_helper.to_array(zp).any():
                problems["nonzero_zero_point"].append(_name(n, i))
            src = producer.get(n.input[0])
            if src is not None and key(src[1]) in Q_OPS:
                stats["qdq_pairs"] += 1
        ends = terminals(n.output[0])
        off = [c for _, c in ends if c.op_type not in QUANTIZABLE]
        if off:
            where = ", ".join(f"{c.name or c.op_type} ({c.op_type})" for c in off[:3])
            problems["not_feeding_matmul"].append(f"{_name(n, i)} -> {where}")
    for i, n in enumerate(graph.node):
        if n.op_type not in QUANTIZABLE or len(n.input) < 2:
            continue
        srcs = [source(x) for x in n.input[:2]]
        dqs = [s for s in srcs if s is not None and key(s) in DQ_OPS]
        if len(dqs) == 2:
            stats["quantized_layers"] += 1
        elif len(dqs) == 1 and weight_only(dqs[0]):
            stats["weight_only_layers"] += 1
        elif len(dqs) == 1:
            float_in = n.input[srcs.index(next(s for s in srcs if s is None or key(s) not in DQ_OPS))]
            problems["half_quantized"].append(f"{_name(n, i)} (float input {float_in!r})")
    return problems, stats


def _rounds_to_inf(a, precision: str):
    """Which float values become +-inf (or are not finite) once rounded to ``precision``."""
    import numpy as np

    a = np.asarray(a, dtype=np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return ~np.isfinite(a.astype(np.float16))
    # bf16: float32's top 16 bits, rounded to nearest even
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return (r & 0x7F80) == 0x7F80


def _check_constants(graph, precisions) -> list[str]:
    import numpy as np
    from onnx import TensorProto, numpy_helper

    bad = []
    for name, t in const_tensors(graph).items():
        if t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16) or t.data_location == TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(t)
        for precision in precisions:
            over = _rounds_to_inf(a, precision)
            if over.any():
                worst = a.reshape(-1)[over.reshape(-1)][0]
                bad.append(f"{name} ({int(over.sum())} value(s) such as {float(worst):.4g} overflow {precision.upper()})")
                break
    return bad


QDQ_MESSAGES = {
    "not_feeding_matmul": "Q/DQ pairs that feed no MatMul/Gemm/Conv (TensorRT runs their consumer in floating "
    "point: the pair only adds a float round trip and blocks fusion)",
    "half_quantized": "matmuls with one quantised and one float input (no integer kernel: quantise both, or neither)",
    "q_without_dq": "QuantizeLinear nodes not followed by a DequantizeLinear",
    "nonzero_zero_point": "DequantizeLinear nodes with non-zero zero points (TensorRT's parser accepts symmetric quantisation only)",
}


def reduced_precisions(target) -> tuple[str, ...]:
    """The reduced float precisions an engine for ``target`` may run layers in (both for a bare
    TensorRT version, whose device is unknown)."""
    if isinstance(target, str):
        return tuple(REDUCED_MAX)
    return tuple(p for p in REDUCED_MAX if p in target.device.precisions)


def readiness_report(onnx_path: str | Path, target, precisions: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every check; never raises for a graph problem. ``target``: a ``TargetProfile`` (its
    ``device.tensorrt`` version is used) or a TensorRT version string such as ``"10.13"``.
    ``precisions``: the reduced float precisions whose range the constants must fit (default: those
    the target supports, see ``reduced_precisions``)."""
    import onnx

    onnx_path = Path(onnx_path)
    text = target if isinstance(target, str) else target.device.tensorrt
    if not text:
        raise ConfigError(
            f"target {target.name} names no TensorRT version (device.tensorrt)",
            source=target.path or target.name,
            hint="the readiness check is for TensorRT targets; set device.tensorrt in the profile",
        )
    version = parse_version(text)
    lo, hi = opset_range(version)
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = _check_ops(graph, version)
    shapes = _check_shapes(graph)
    qdq, stats = _check_qdq(graph)
    opset_bad = [] if opset is not None and lo <= opset <= hi else [f"opset {opset}"]
    precisions = reduced_precisions(target) if precisions is None else tuple(precisions)
    constants = _check_constants(graph, precisions)

    problems = []
    if ops:
        problems.append({"check": "ops", "message": f"ops TensorRT {text}'s ONNX parser does not import", "nodes": ops})
    if shapes:
        problems.append({"check": "shapes", "message": "dynamic dimensions (the engine profile fixes every shape)", "nodes": shapes})
    for kind, nodes in qdq.items():
        if nodes:
            problems.append({"check": "qdq", "kind": kind, "message": QDQ_MESSAGES[kind], "nodes": nodes})
    if constants:
        problems.append({"check": "constants", "message": f"float constants beyond the range of {'/'.join(p.upper() for p in precisions)} "
                         "(an engine in that precision holds them as +-inf: a fully masked softmax row becomes NaN)", "nodes": constants})
    if opset_bad:
        problems.append({"check": "opset", "message": f"default-domain opset {opset} outside {lo}..{hi}, the range TensorRT {text} documents", "nodes": []})
    return {
        "onnx": onnx_path.name,
        "tensorrt": text,
        "opset": opset,
        "opset_range": [lo, hi],
        "nodes": len(graph.node),
        "reduced_precisions": list(precisions),
        "ready": not problems,
        "qdq": stats,
        "problems": problems,
    }


def check_readiness(onnx_path: str | Path, target, precisions: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``readiness_report`` that raises ``ReadinessError`` naming the offending nodes when any check fails."""
    report = readiness_report(onnx_path, target, precisions)
    if report["ready"]:
        return report
    lines = []
    for p in report["problems"]:
        names = p["nodes"][:MAX_NAMES]
        more = f" and {len(p['nodes']) - MAX_NAMES} more" if len(p["nodes"]) > MAX_NAMES else ""
        lines.append(f"{p['message']}: {'; '.join(names)}{more}" if names else p["message"])
    raise ReadinessError(
        f"not ready for TensorRT {report['tensorrt']}: " + " | ".join(lines),
        source=onnx_path,
        hint="re-export with static shapes and a supported opset (export stage), keep unsupported layers out of "
        "quantisation (quantize.exclude), replace out-of-range constants with ones the reduced precision holds, "
        "or use a recipe written for this target",
    )
