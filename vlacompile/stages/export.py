"""export: the torch policy -> one static-shape ONNX graph, checked against torch with polygraphy.

The graph is the whole policy (pre-processing, System 2, the unrolled flow loop of System 1,
un-normalisation), with the policy spec's named inputs and the output ``actions``, and the static
shapes of the spec at ``batch_size`` (TensorRT profiles and the ORT CPU runner want static shapes).
With ``split`` the family's ``SplitPlan`` is exported too: System 2 and one System 1 step as two
graphs, and ``split.json`` saying how a runner drives them.

Exporters (DESIGN.md, tooling facts): the dynamo exporter is exact to ~1e-7 for plain, pruned and
distilled models; modelopt fake-quant models export only with the TorchScript exporter, which writes
their quantisers as standard QuantizeLinear/DequantizeLinear (or TensorRT-only ops for FP8/INT4).

After export the graph is normalised so the bytes depend only on the model:

* node names become ``/<module path>/<op>``: dynamo's ``node_linear_19`` becomes
  ``/expert/state_in/node_linear_19`` (from the exporter's name-scope metadata), TorchScript's
  ``/expert/blocks.0/attn_1/MatMul`` becomes ``/expert/blocks/0/attn/MatMul_1`` (mapped onto the
  module tree), so quantisers map torch module names to ONNX nodes the same way for both;
* doc strings and metadata (the dynamo exporter stores stack traces with file paths) are dropped;
* the TorchScript graph's Identity nodes and repeated subexpressions (every weight's
  quantiser once per unrolled flow step) are merged;
* transposes of constant weights are folded into the weights (the dynamo exporter leaves them
  unfolded for weights shared across flow steps, which hides them from the ORT quantisers), and
  the QuantizeLinear of a constant weight is folded into an int8 weight feeding its
  DequantizeLinear directly, the layout TensorRT and ORT expect (and a 4x smaller file).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlacompile.artifact import SPLIT_JSON, SPLIT_NAMES, STUDENT_ONNX, onnx_files, sha256_files, split_files, write_split_manifest
from vlacompile.errors import ConfigError, VlaCompileError
from vlacompile.families.base import apply_ops
from vlacompile.policy import OUTPUT_NAMES, Policy
from vlacompile.stages import Artifact, BuildContext, Kind

ONNX_NAME = STUDENT_ONNX
MIN_OPSET, MAX_OPSET = 17, 21  # 17: LayerNormalization is one op; 21: the newest both exporters write
COMPARE_SAMPLES = 4  # calibration observations (or example inputs) the ORT-vs-torch check runs


class ExportError(VlaCompileError):
    """A model that does not export, or whose exported graph does not compute what torch computes."""


@dataclass(frozen=True)
class Params:
    opset: int = 18
    batch_size: int = 1  # static batch of the exported graph
    dynamo: bool | None = None  # None: dynamo for plain models, TorchScript for modelopt fake-quant models
    max_abs_diff: float = 1e-3  # ORT vs torch, FP32 export: elementwise absolute OR relative tolerance
    # ORT vs the fake-quant torch model, as RMS error over RMS output. Exact agreement is impossible
    # there: a float rounding difference flips an activation to the next int8 step now and then
    # (measured ~0.2% on the tiny teacher); a wrong scale or axis gives errors of order 1.
    quantized_rel_rms: float = 0.05
    external_data_threshold_mb: float = 1024  # weights go to <name>.data above this total size
    # Also write System 2 (once per chunk) and one System 1 step (K times) as separate graphs, for
    # runtimes that schedule them apart (TensorRT on the device) and for per-part latency.
    split: bool = False


def kinds(params: Params, target) -> tuple[Kind, Kind]:
    return "torch", "onnx"


def check(params: Params, target, source: str = "recipe") -> None:
    if not MIN_OPSET <= params.opset <= MAX_OPSET:
        raise ConfigError(
            f"export.opset is {params.opset}; vlacompile exports opsets {MIN_OPSET}..{MAX_OPSET}",
            source=source,
            hint="use opset = 18 unless the target's runtime needs another",
        )
    if params.batch_size < 1:
        raise ConfigError(f"export.batch_size is {params.batch_size}; it must be >= 1", source=source,
                          hint="the graph's static batch: 1 for a robot's get_action")
    for key in ("max_abs_diff", "quantized_rel_rms"):
        if not getattr(params, key) > 0:
            raise ConfigError(f"export.{key} is {getattr(params, key)}; it must be > 0", source=source,
                              hint=f"e.g. {key} = {Params.__dataclass_fields__[key].default} (its default)")
    if params.external_data_threshold_mb < 0:
        raise ConfigError(f"export.external_data_threshold_mb is {params.external_data_threshold_mb}; it must be >= 0", source=source,
                          hint="graphs larger than this many MB keep their weights in a .data file beside them; 0 always does")


# ---------------------------------------------------------------------------------------------
# Export


def _exporter_error(e: Exception, exporter: str, what: str, exporter_log: str, also: str = "") -> ExportError:
    detail = str(e).strip().splitlines()
    return ExportError(
        f"the {exporter} exporter failed on {what}: {detail[0] if detail else type(e).__name__}",
        source="export",
        hint=f"try the other exporter (export.dynamo = true/false){', ' + also if also else ''}; the exporter said:\n"
        + exporter_log[-2000:],
    )


def is_fake_quantized(module) -> bool:
    """Whether ``module`` carries modelopt quantisers (checked by class name: no modelopt import)."""
    return any(type(m).__name__ == "TensorQuantizer" for m in module.modules())


def export_policy(
    policy: Policy,
    path: str | Path,
    *,
    opset: int = 18,
    batch_size: int = 1,
    dynamo: bool | None = None,
    external_data_threshold_mb: float = 1024,
) -> Path:
    """Export ``policy`` to ``path`` (static shapes, deterministic bytes) and check it with onnx.checker.

    ``dynamo=None`` picks the dynamo exporter for plain models and the TorchScript one for modelopt
    fake-quant models. Returns ``path``. Raises ``ExportError`` naming the model and the exporter.
    """
    import onnx

    path = Path(path)
    quantized = is_fake_quantized(policy.module)
    use_dynamo = (not quantized) if dynamo is None else dynamo
    if use_dynamo and quantized:
        raise ExportError(
            "a modelopt fake-quant model cannot be exported with the dynamo exporter",
            source=path,
            hint="set dynamo = false (or leave it unset) in the export stage",
        )
    model = _export_proto(policy, opset=opset, batch_size=batch_size, dynamo=use_dynamo, scratch=path.parent)
    normalize_graph(model, exporter="dynamo" if use_dynamo else "torchscript", module=policy.module)
    save_onnx(model, path, external_data_threshold_mb=external_data_threshold_mb)
    try:
        onnx.checker.check_model(str(path))  # path-based: works with external data and > 2 GB
    except onnx.checker.ValidationError as e:
        raise ExportError(
            f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}",
            source=path,
            hint="try the other exporter (export.dynamo = true/false) or another opset",
        ) from None
    return path


def _export_proto(policy: Policy, *, opset: int, batch_size: int, dynamo: bool, scratch: Path):
    example = policy.spec.example_inputs(batch=batch_size, seed=0)
    names = policy.spec.input_names
    args = tuple(example[k] for k in names)
    model = _run_exporter(policy.module.eval(), args, names, OUTPUT_NAMES, opset=opset, dynamo=dynamo,
                          scratch=scratch, what=f"the {policy.family} policy")
    _pin_output_shapes(model, policy.module, args)
    return model


def _pin_output_shapes(model, module, args: tuple) -> None:
    """Write the outputs' static shapes into the graph. The TorchScript exporter leaves output
    dims it derived through reshapes symbolic, although every shape is fixed by the static inputs
    (TensorRT's profile and the readiness check want them written)."""
    import torch

    with torch.no_grad():
        out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o, t in zip(model.graph.output, outs, strict=True):
        dims = o.type.tensor_type.shape.dim
        if len(dims) != t.dim():
            continue
        for d, n in zip(dims, t.shape):
            if not d.HasField("dim_value") or d.dim_value != n:
                d.Clear()
                d.dim_value = int(n)


def _run_exporter(module, args: tuple, input_names, output_names, *, opset: int, dynamo: bool, scratch: Path,
                  what: str, also: str = ""):
    """torch.onnx.export with either exporter, quietly -> ModelProto; failures become ExportError."""
    import logging
    import tempfile

    import onnx
    import torch

    exporter = "dynamo" if dynamo else "torchscript"
    log = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        # Both exporters print progress, warnings (tracer, deprecation) and log lines (torchvision
        # ops not registered) that say nothing to a user.
        torch_onnx_log.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    module, args, None, input_names=list(input_names), output_names=list(output_names),
                    opset_version=opset, dynamo=True, verbose=False,
                )
                return program.model_proto
            # TorchScript writes > 2 GB models only to files (one per weight); read them back.
            with tempfile.TemporaryDirectory(dir=scratch, prefix=".export-") as tmp:
                torch.onnx.export(
                    module, args, str(Path(tmp) / "model.onnx"), input_names=list(input_names),
                    output_names=list(output_names), opset_version=opset, dynamo=False, do_constant_folding=True,
                )
                return onnx.load(str(Path(tmp) / "model.onnx"))
    except Exception as e:  # the exporters raise many kinds; the user needs what failed and what to try
        raise _exporter_error(e, exporter, what, log.getvalue(), also=also) from e
    finally:
        torch_onnx_log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Graph normalisation


def const_tensors(graph) -> dict[str, Any]:
    """Initializers and Constant-node values by name, as TensorProtos (converted only when used)."""
    tensors = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            tensors[n.output[0]] = n.attribute[0].t
    return tensors


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node, name: str, value) -> None:
    import onnx

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def _rewire(graph, renames: dict[str, str], drop: set[int]) -> None:
    """Point every read of a value in ``renames`` at its replacement and remove the nodes in ``drop``."""
    # Indices, not id(): protobuf hands out a fresh wrapper object on every access.
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in renames:
                n.input[i] = renames[name]
    del graph.node[:]
    graph.node.extend(kept)


def _rename_by_scope(graph) -> None:
    """Dynamo node names (``node_MatMul_25``) -> ``/vision/blocks.0/attn/qkv/node_MatMul_25``."""
    for n in graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        module = ""
        if scopes:
            try:
                names = ast.literal_eval(scopes)
                module = names[-2] if len(names) >= 2 else ""
            except (ValueError, SyntaxError):
                module = ""
        n.name = "/" + "/".join([*module.split("."), n.name]) if module else "/" + n.name


def _remove_identities(graph) -> None:
    """Identity nodes (the TorchScript exporter adds one per reuse of a weight) -> direct reads."""
    outputs = {o.name for o in graph.output}
    renames: dict[str, str] = {}
    drop: set[int] = set()
    for idx, n in enumerate(graph.node):
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output[0] not in outputs:
            renames[n.output[0]] = renames.get(n.input[0], n.input[0])
            drop.add(idx)
    _rewire(graph, renames, drop)


NOT_PURE = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial")


def _eliminate_common_subexpressions(graph) -> None:
    """Merge nodes computing the same op on the same inputs (in topological order, so chains merge
    too): the unrolled flow loop repeats every weight's Constant/Q/DQ/Transpose once per step."""
    outputs = {o.name for o in graph.output}
    renames: dict[str, str] = {}
    seen: dict[tuple, Any] = {}
    drop: set[int] = set()
    for idx, n in enumerate(graph.node):
        for i, name in enumerate(n.input):
            if name in renames:
                n.input[i] = renames[name]
        if n.domain not in ("", "ai.onnx") or n.op_type in NOT_PURE or any(o in outputs for o in n.output):
            continue
        key = (n.op_type, tuple(n.input), tuple(a.SerializeToString(deterministic=True) for a in n.attribute), len(n.output))
        first = seen.get(key)
        if first is None:
            seen[key] = n
            continue
        for mine, theirs in zip(n.output, first.output, strict=True):
            renames[mine] = theirs
        drop.add(idx)
    _rewire(graph, renames, drop)


def _module_path(components: list[str], root) -> str | None:
    """A TorchScript scope (``expert``, ``blocks.0``, ``attn_1``; Sequential children as
    ``time_mlp.0``) -> the qualified module name (``expert.blocks.0.attn``), or None if unknown."""
    module, path = root, []
    for comp in components:
        for cand in (comp, re.sub(r"_\d+$", "", comp)):  # "_1": the module's second call
            parts = cand.split(".")
            children = dict(module.named_children())
            if len(parts) > 1 and path and parts[0] == path[-1] and parts[1] in children:
                parts = parts[1:]  # a Sequential child named with its parent's attribute
            cur = module
            for part in parts:
                cur = dict(cur.named_children()).get(part)
                if cur is None:
                    break
            if cur is not None:
                module, path = cur, path + parts
                break
        else:
            return None
    return ".".join(path)


def _rename_torchscript(graph, root) -> None:
    """TorchScript node names (``/expert/blocks.0/attn_1/MatMul``) -> the same scheme as dynamo's
    (``/expert/blocks/0/attn/MatMul_2``): module path components, then a unique op label."""
    taken: set[str] = set()
    for n in graph.node:
        parts = n.name.split("/")
        module = _module_path([p for p in parts[1:-1] if p], root) if n.name.startswith("/") else None
        if module is None:
            taken.add(n.name)
            continue
        stem = "/" + "/".join([*(module.split(".") if module else []), parts[-1]])
        name, k = stem, 0
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        n.name = name


def _per_axis(arr: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-axis scale or zero point, shaped to broadcast against a tensor of rank ``ndim``."""
    if arr.size == 1:
        return arr.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return arr.reshape(shape)


def _fold_weight_quantizers(graph) -> None:
    """QuantizeLinear(constant weight) -> an int8 initializer, computed exactly as the op does."""
    from onnx import numpy_helper

    consts = const_tensors(graph)
    names = set(consts) | {o for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    renames: dict[str, str] = {}
    drop: set[int] = set()  # node indices
    for idx, n in enumerate(graph.node):
        if not (
            n.op_type == "QuantizeLinear"
            and n.domain in ("", "ai.onnx")
            and len(n.input) == 3
            and all(i in consts for i in n.input)
            and n.output[0] not in outputs
            and _attr(n, "block_size", 0) == 0
        ):
            continue
        zp = numpy_helper.to_array(consts[n.input[2]])
        if zp.dtype not in (np.int8, np.uint8):
            continue
        w = numpy_helper.to_array(consts[n.input[0]]).astype(np.float32)
        axis = _attr(n, "axis", 1)
        scale = _per_axis(numpy_helper.to_array(consts[n.input[1]]).astype(np.float32), w.ndim, axis)
        zp = _per_axis(zp, w.ndim, axis)
        info = np.iinfo(zp.dtype)
        # ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point), in float32.
        q = np.clip(np.rint(w / scale) + zp.astype(np.float32), info.min, info.max).astype(zp.dtype)
        name = n.input[0] + "_quantized"
        while name in names:  # the same weight under two quantisers
            name += "_"
        names.add(name)
        graph.initializer.append(numpy_helper.from_array(q, name))
        renames[n.output[0]] = name
        drop.add(idx)
    _rewire(graph, renames, drop)


def _fold_weight_transposes(graph) -> None:
    """Transpose(constant weight) -> a transposed initializer; also through a per-axis
    DequantizeLinear of an int8 weight (the axis follows the permutation)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    consts = const_tensors(graph)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    renames: dict[str, str] = {}
    drop: set[int] = set()  # node indices
    reshaped: set[str] = set()
    for idx, n in enumerate(graph.node):
        if n.op_type != "Transpose" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
            continue
        src = n.input[0]
        perm = _attr(n, "perm")
        if src in inits:
            name = src + ".T"
            if name not in inits:
                arr = numpy_helper.to_array(inits[src])
                order = list(perm) if perm is not None else list(reversed(range(arr.ndim)))
                inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr.transpose(order)), name)
                graph.initializer.append(inits[name])
            renames[n.output[0]] = name
            drop.add(idx)
            continue
        dq = producer.get(src)
        if not (
            dq is not None
            and dq.op_type == "DequantizeLinear"
            and dq.domain in ("", "ai.onnx")
            and dq.input[0] in inits
            and uses.get(src) == 1
            and uses.get(dq.input[0]) == 1
            and dq.input[1] in consts
            and _attr(dq, "block_size", 0) == 0
        ):
            continue
        w = inits[dq.input[0]]
        arr = numpy_helper.to_array(w)
        order = list(perm) if perm is not None else list(reversed(range(arr.ndim)))
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.transpose(order)), w.name))
        scale_dims = list(consts[dq.input[1]].dims)
        if len(scale_dims) == 1 and scale_dims[0] > 1:  # per-axis: the axis moves with the data
            _set_attr(dq, "axis", order.index(_attr(dq, "axis", 1) % arr.ndim))
        renames[n.output[0]] = src
        drop.add(idx)
        reshaped.add(src)
    _rewire(graph, renames, drop)
    vis = [v for v in graph.value_info if v.name not in reshaped]  # their recorded shapes are stale
    del graph.value_info[:]
    graph.value_info.extend(vis)


def _drop_unused(graph) -> None:
    """Remove initializers and Constant nodes nothing reads any more."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def strip_metadata(model) -> None:
    """Drop doc strings and metadata everywhere: they carry stack traces, file paths and tool chatter."""
    model.doc_string = ""
    del model.metadata_props[:]
    g = model.graph
    g.doc_string = ""
    del g.metadata_props[:]
    for coll in (g.node, g.initializer, g.input, g.output, g.value_info):
        for item in coll:
            item.doc_string = ""
            del item.metadata_props[:]


def normalize_graph(model, *, exporter: str, module=None) -> None:
    """In place: the clean, deterministic graph described in the module docstring. ``module`` is
    the exported torch module (TorchScript node names are mapped onto its module tree)."""
    if exporter == "dynamo":
        _rename_by_scope(model.graph)
    elif module is not None:
        _rename_torchscript(model.graph, module)
    _remove_identities(model.graph)
    _eliminate_common_subexpressions(model.graph)
    _fold_weight_quantizers(model.graph)
    _fold_weight_transposes(model.graph)
    _drop_unused(model.graph)
    strip_metadata(model)


def save_onnx(model, path: Path, *, external_data_threshold_mb: float = 1024) -> list[Path]:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` when they exceed the threshold.
    Returns the files written."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    weight_bytes = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    if weight_bytes > external_data_threshold_mb * 2**20:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def _tensor_nbytes(t) -> int:
    from onnx import helper

    n = int(np.prod(t.dims)) if t.dims else 1
    if t.data_location == 1:  # already external
        return next((int(e.value) for e in t.external_data if e.key == "length"), 0)
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


# ---------------------------------------------------------------------------------------------
# Split export: System 2 and one System 1 step as two graphs


def _export_part(part, args: tuple, names: tuple, outputs: tuple, path: Path, *, opset: int, dynamo: bool,
                 external_data_threshold_mb: float) -> None:
    import onnx

    model = _run_exporter(part, args, names, outputs, opset=opset, dynamo=dynamo, scratch=path.parent,
                          what=path.stem, also="or set export.split = false")
    _pin_output_shapes(model, part, args)
    normalize_graph(model, exporter="dynamo" if dynamo else "torchscript", module=part)
    save_onnx(model, path, external_data_threshold_mb=external_data_threshold_mb)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}", source=path) from None


def export_split(
    policy: Policy,
    out_dir: str | Path,
    *,
    opset: int = 18,
    dynamo: bool | None = None,
    batch_size: int = 1,
    external_data_threshold_mb: float = 1024,
) -> dict[str, Any]:
    """Write ``system2.onnx``, ``system1.onnx`` and ``split.json`` into ``out_dir`` from the family's
    ``SplitPlan``: System 2 once per chunk (what it hands System 1: prefix features, or per-layer
    K/V), one System 1 velocity step, and the glue (derived inputs, the integrator, the action
    post-processing) as data for one generic runner (``vlacompile.backends.split``). Static shapes
    at ``batch_size``. Returns what the export record stores."""
    import onnx
    import torch

    from vlacompile.families import get_family

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = policy.module.eval()
    quantized = is_fake_quantized(module)
    use_dynamo = (not quantized) if dynamo is None else dynamo
    if use_dynamo and quantized:
        raise ExportError(
            "a modelopt fake-quant model cannot be exported with the dynamo exporter",
            source="export", hint="set dynamo = false (or leave it unset) in the export stage",
        )
    family = get_family(policy.family)
    if family is None:
        raise ExportError(f"policy family {policy.family!r} is not registered: it has no split plan", source="export",
                          hint="set export.split = false for this policy")
    try:
        plan = family.split_plan(policy)
    except NotImplementedError as e:
        raise ExportError(f"the {policy.family} policy cannot be split into System 2 and System 1 graphs: {e}",
                          source="export", hint="set export.split = false for this policy") from None
    ex = policy.spec.example_inputs(batch=batch_size, seed=0)
    values: dict[str, Any] = dict(ex)
    for d in plan.derived:
        values[d["output"]] = apply_ops(values[d["input"]], d["ops"])
    with torch.no_grad():
        carry = plan.system2(*[values[n] for n in plan.system2_inputs])
    carry = carry if isinstance(carry, tuple) else (carry,)
    values.update(zip(plan.system2_outputs, carry, strict=True))
    integ = plan.integrator
    values[integ["x"]] = values[integ["init"]]
    values[integ["t"]] = torch.full((batch_size,), float(integ["times"][0]))
    parts = {
        "system2": (plan.system2, tuple(values[n] for n in plan.system2_inputs), plan.system2_inputs, plan.system2_outputs),
        "system1": (plan.system1, tuple(values[n] for n in plan.system1_inputs), plan.system1_inputs, plan.system1_outputs),
    }
    manifest: dict[str, Any] = {
        "family": policy.family,
        "batch_size": batch_size,
        "flow_steps": len(integ["times"]),
        "inputs": list(policy.spec.input_names),
        "derived": plan.derived,
        "integrator": integ,
        "post": plan.post,
    }
    files: list[Path] = []
    nodes: dict[str, int] = {}
    for part, (mod, args, names, outputs) in parts.items():
        path = out_dir / SPLIT_NAMES[part]
        _export_part(mod, args, names, outputs, path, opset=opset, dynamo=use_dynamo, external_data_threshold_mb=external_data_threshold_mb)
        graph = onnx.load(str(path), load_external_data=False).graph
        nodes[part] = len(graph.node)
        manifest[part] = {
            "onnx": path.name,
            "inputs": {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input},
            "outputs": {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output},
            "output_names": [o.name for o in graph.output],  # the order the runtime returns them in
        }
        files += onnx_files(path)
    write_split_manifest(out_dir, manifest)
    return {
        "onnx": [SPLIT_NAMES["system2"], SPLIT_NAMES["system1"]],
        "manifest": SPLIT_JSON,
        "files": [p.name for p in files] + [SPLIT_JSON],
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": sha256_files(files),
        "nodes": nodes,
        "exporter": "dynamo" if use_dynamo else "torchscript",
    }


# ---------------------------------------------------------------------------------------------
# ORT vs torch (polygraphy)


def unsupported_domains(path: Path) -> list[str]:
    """Op domains ONNX Runtime's CPU provider cannot run (modelopt's FP8/INT4 exports use ``trt``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    known = {"", "ai.onnx", "com.microsoft", "ai.onnx.ml"}
    return sorted({n.domain for n in model.graph.node} - known)


def _torch_runner(module, example: dict[str, np.ndarray], names: tuple[str, ...]):
    """A polygraphy runner around a CPU torch module (polygraphy's PytRunner moves inputs to CUDA)."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="torch", prefix="torch-runner")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for k in names:
                meta.add(k, example[k].dtype, example[k].shape)
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = module(*[torch.from_numpy(np.ascontiguousarray(feed_dict[k])) for k in names])
            self.inference_time = time.perf_counter() - t0
            return OrderedDict([(OUTPUT_NAMES[0], out.numpy())])

    return TorchCpuRunner()


def compare_with_torch(
    path: Path, module, feeds: list[dict[str, np.ndarray]], *, atol: float, rtol: float, names: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Run the ONNX graph (ORT, CPU) and the torch module on ``feeds`` with polygraphy's Comparator.

    Returns max_abs_diff, max_rel_diff, rel_rms (RMS error / RMS torch output) and passed
    (polygraphy's elementwise check: |d| <= atol or |d|/|torch| <= rtol).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    try:
        from polygraphy.comparator import SimpleCompareFunc as simple  # polygraphy >= 0.50
    except ImportError:
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the verdict and numbers are reported by the caller
            names = tuple(names or feeds[0])
            runners = [OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])), _torch_runner(module, feeds[0], names)]
            results = Comparator.run(runners, data_loader=feeds)
            accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol))
    except Exception as e:
        detail = str(e).strip().splitlines()
        raise ExportError(
            f"ONNX Runtime or torch could not run the exported graph's inputs: {detail[0] if detail else type(e).__name__}",
            source=path,
            hint="try the other exporter (export.dynamo = true/false) or another opset",
        ) from e
    (_, ort_out), (_, torch_out) = list(results.items())
    diffs = [it[OUTPUT_NAMES[0]].astype(np.float64) - ref[OUTPUT_NAMES[0]] for it, ref in zip(ort_out, torch_out, strict=True)]
    ref_all = np.concatenate([r[OUTPUT_NAMES[0]].ravel() for r in torch_out]).astype(np.float64)
    d_all = np.concatenate([d.ravel() for d in diffs])
    groups = [accuracy] if hasattr(accuracy, "values") else list(accuracy)  # one result, or one per compare func
    max_rel = max(float(r.max_reldiff) for res in groups for its in res.values() for it in its for r in it.values())
    return {
        "max_abs_diff": float(np.abs(d_all).max()),
        "max_rel_diff": max_rel,
        "rel_rms": float(np.sqrt(np.mean(d_all**2)) / max(np.sqrt(np.mean(ref_all**2)), 1e-12)),
        "passed": bool(accuracy),
    }


def comparison_feeds(policy: Policy, ctx: BuildContext | None, batch_size: int, n: int = COMPARE_SAMPLES):
    """Real observations when calibration episodes are there (else the spec's example inputs),
    with seeded noise, in batches of the graph's static batch size."""
    if ctx is not None and ctx.calibration is not None:
        from vlacompile.quantizers import sample_inputs

        inputs = sample_inputs(policy.spec, ctx.calibration, n * batch_size, seed=ctx.seed)
        m = len(next(iter(inputs.values()))) // batch_size * batch_size
        if m:
            return [{k: v[i : i + batch_size] for k, v in inputs.items()} for i in range(0, m, batch_size)], "calibration episodes"
    feeds = [{k: v.numpy() for k, v in policy.spec.example_inputs(batch=batch_size, seed=s).items()} for s in range(n)]
    return feeds, "example inputs"


def run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact:
    from vlacompile.config_util import to_dict

    t0 = time.perf_counter()
    policy = artifact.policy
    path = Path(ctx.workdir) / ONNX_NAME
    quantized = artifact.quantized_torch or is_fake_quantized(policy.module)
    exporter = "dynamo" if (params.dynamo if params.dynamo is not None else not quantized) else "torchscript"
    ctx.log(f"export: {exporter} exporter, opset {params.opset}, static batch {params.batch_size} -> {path.name}")
    export_policy(
        policy, path, opset=params.opset, batch_size=params.batch_size, dynamo=params.dynamo,
        external_data_threshold_mb=params.external_data_threshold_mb,
    )
    export_seconds = time.perf_counter() - t0

    import onnx

    files = onnx_files(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    record: dict[str, Any] = {
        "stage": "export",
        "params": to_dict(params),
        "onnx": path.name,
        "files": [p.name for p in files],
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": sha256_files(files),
        "opset": params.opset,
        "nodes": len(graph.node),
        "exporter": exporter,
        "export_seconds": round(export_seconds, 2),
    }

    foreign = unsupported_domains(path)
    if foreign:
        # modelopt's FP8 and INT4-AWQ exports use TensorRT-only ops: only TensorRT can run them.
        record.update(
            compared_against=None,
            max_abs_diff=None,
            comparison=f"skipped: the graph uses op domain(s) {foreign} that only TensorRT runs; "
            "it is checked when the engine is built on the device",
        )
        ctx.log(f"export: {record['comparison']}")
    else:
        feeds, feeds_from = comparison_feeds(policy, ctx, params.batch_size)
        tol = params.max_abs_diff
        cmp = compare_with_torch(path, policy.module, feeds, atol=tol, rtol=tol, names=policy.spec.input_names)
        record.update(
            compared_against="torch fake-quant" if quantized else "torch fp32",
            comparison_inputs=f"{len(feeds)} x batch {params.batch_size} from {feeds_from}",
            max_abs_diff=cmp["max_abs_diff"],
            max_rel_diff=cmp["max_rel_diff"],
            rel_rms=cmp["rel_rms"],
        )
        ctx.log(
            f"export: ORT vs {record['compared_against']}: max |diff| {cmp['max_abs_diff']:.3g}, "
            f"relative RMS {cmp['rel_rms']:.3g}"
        )
        if quantized and cmp["rel_rms"] > params.quantized_rel_rms:
            raise ExportError(
                f"ONNX Runtime's output of the quantised graph differs from the fake-quant torch model by "
                f"{cmp['rel_rms']:.3g} relative RMS (tolerance {params.quantized_rel_rms})",
                source=path,
                hint="the Q/DQ export is wrong (scale or axis); check the quantize stage's excludes, "
                "or raise export.quantized_rel_rms if the model is very sensitive to int8 rounding",
            )
        if not quantized and not cmp["passed"]:
            raise ExportError(
                f"ONNX Runtime's output differs from torch by up to {cmp['max_abs_diff']:.3g} "
                f"(tolerance {tol}, absolute or relative, elementwise)",
                source=path,
                hint="try the other exporter (export.dynamo = true/false) or another opset; "
                "raise export.max_abs_diff only if the model's action scale makes 1e-3 too strict",
            )
    if params.split:
        record["split"] = _split_and_check(policy, params, ctx, quantized=quantized, foreign=bool(foreign))
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return Artifact(
        policy=policy,
        onnx_path=path,
        precision=artifact.precision,
        quantized_torch=artifact.quantized_torch,
        records=[*artifact.records, record],
        extra_files=tuple(split_files(ctx.workdir)) if params.split else (),
    )


def _split_and_check(policy: Policy, params: Params, ctx: BuildContext, *, quantized: bool, foreign: bool) -> dict[str, Any]:
    """Write the System 2 / System 1 graphs beside the single graph and check that running them in
    order (System 2 once, System 1 K times) gives torch's actions."""
    import torch

    from vlacompile.backends.split import SplitRunner

    t0 = time.perf_counter()
    info = export_split(
        policy, ctx.workdir, opset=params.opset, dynamo=params.dynamo, batch_size=params.batch_size,
        external_data_threshold_mb=params.external_data_threshold_mb,
    )
    if foreign:
        info["comparison"] = "skipped: TensorRT-only ops (checked when the engines are built on the device)"
        info["seconds"] = round(time.perf_counter() - t0, 2)
        return info
    feeds, _ = comparison_feeds(policy, ctx, params.batch_size)
    runner = SplitRunner(ctx.workdir, policy.spec)
    got = np.concatenate([runner.run(f) for f in feeds]).astype(np.float64)
    with torch.inference_mode():
        want = np.concatenate([policy.run_feeds(f).numpy() for f in feeds])
    d = got - want
    tol = params.max_abs_diff
    info.update(
        compared_against="torch fake-quant" if quantized else "torch fp32",
        max_abs_diff=float(np.abs(d).max()),
        rel_rms=float(np.sqrt(np.mean(d**2)) / max(np.sqrt(np.mean(want.astype(np.float64) ** 2)), 1e-12)),
    )
    ctx.log(f"export: split graphs (System 2 + {policy.spec.flow_steps} x System 1) vs {info['compared_against']}: "
            f"max |diff| {info['max_abs_diff']:.3g}")
    bad = info["rel_rms"] > params.quantized_rel_rms if quantized else not np.all(np.abs(d) <= tol * np.maximum(1.0, np.abs(want)))
    if bad:
        raise ExportError(
            f"the split graphs run in order differ from torch by up to {info['max_abs_diff']:.3g} "
            f"(relative RMS {info['rel_rms']:.3g})",
            source=Path(ctx.workdir) / SPLIT_JSON,
            hint="the split export disagrees with the single graph; set export.split = false and report the model",
        )
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info
