"""quantize: INT8 / INT4 / FP8 / FP16 for the target's runtime, with per-module exclusions.

Methods (backends in ``vlacompile/quantizers/``):

    method        consumes -> produces   precisions        runtimes
    ort-dynamic   onnx -> onnx           int8              onnxruntime (MatMulInteger: not a TensorRT layer)
    ort-static    onnx -> onnx           int8              onnxruntime, tensorrt (symmetric QDQ)
    ort-int4      onnx -> onnx           int4              onnxruntime (MatMulNBits: an ORT contrib op)
    modelopt      torch -> torch         int8, fp8, int4   tensorrt; onnxruntime for int8 only
                                                           (its FP8/INT4 exports use TensorRT-only ops)

``precision = "fp16"`` changes no graph: ORT CPU has no fast FP16 kernels, and TensorRT makes FP16
from the FP32 graph with a builder flag; the stage records the precision for the engine builder.

"auto" picks per runtime, from what was measured on this machine (DESIGN.md, tooling facts):

* ONNX Runtime (CPU): INT8 -> ort-dynamic, the fastest INT8 here (~22 ms vs 34 ms FP32; static QDQ
  was no faster than FP32, and modelopt's Q/DQ graph runs slowly in ORT); INT4 -> ort-int4.
* TensorRT: INT8 / FP8 -> modelopt, the explicit Q/DQ TensorRT fuses (FP8/INT8 builder flags without
  Q/DQ silently give FP16 engines) and the most accurate INT8 measured (0.033 vs 0.24-0.28);
  INT4 -> modelopt INT4-AWQ (TensorRT's weight-only INT4; ORT's MatMulNBits does not parse in
  TensorRT). Its graph uses TensorRT-only ops, so export cannot compare it with ORT on a host
  without TensorRT: that check happens when the engine is built.

Default exclusions come from the family (``Family.default_quant_excludes``): they keep the
state/action projections and the patch embedding in higher precision. Most of the INT8 error
measured on the reference family came from the state embedding feeding the read-out token, and
from the attention matmuls, which are left unquantised unless ``quantize_attention``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlacompile.errors import ConfigError, EpisodeError
from vlacompile.policy import Policy
from vlacompile.stages import Artifact, BuildContext, Kind

Precision = Literal["int8", "int4", "fp8", "fp16"]
Method = Literal["auto", "ort-dynamic", "ort-static", "ort-int4", "modelopt"]

METHOD_PRECISIONS = {
    "ort-dynamic": ("int8",),
    "ort-static": ("int8",),
    "ort-int4": ("int4",),
    "modelopt": ("int8", "int4", "fp8"),
}
CALIBRATION_BATCH = 16  # observations per modelopt calibration forward pass


@dataclass(frozen=True)
class Params:
    precision: Precision = "int8"
    method: Method = "auto"
    # Torch module names (a name covers its submodules; globs allowed) or ONNX node-name substrings
    # kept in higher precision. None: the family's defaults (its input/output projections, the patch
    # embedding: where most INT8 error was measured).
    exclude: tuple[str, ...] | None = None
    quantize_attention: bool = False  # also quantise the activation x activation attention MatMuls
    calibration_samples: int = 64
    block_size: int = 32  # INT4 weight-only block size (along the input dimension)
    per_channel: bool = True  # INT8 weights: one scale per output channel (else per tensor)


def resolve_method(params: Params, target) -> str:
    """The method "auto" stands for on ``target`` (see the module docstring for the measurements)."""
    if params.method != "auto" or params.precision == "fp16":
        return params.method
    if target.device.runtime == "onnxruntime":
        return {"int8": "ort-dynamic", "int4": "ort-int4"}.get(params.precision, "modelopt")
    return "modelopt"


def kinds(params: Params, target) -> tuple[Kind, Kind]:
    method = resolve_method(params, target)
    if method == "modelopt":
        return "torch", "torch"
    return "onnx", "onnx"  # ORT methods, and fp16 (recorded for the engine builder after export)


def check(params: Params, target, source: str = "recipe") -> None:
    precision, method = params.precision, resolve_method(params, target)
    runtime = target.device.runtime
    where = f"target {target.name} ({target.path or 'built-in'})"
    if not target.supports(precision):
        extra = ""
        if precision == "fp8":
            extra = f"; {target.device.name} has no FP8 hardware, use int8"
        raise ConfigError(
            f"quantize.precision = {precision!r} is not supported by {where}",
            source=source,
            hint=f"{target.name} supports {', '.join(target.device.precisions)}{extra}",
        )
    if precision == "fp16":
        if params.method != "auto":
            raise ConfigError(
                f"quantize.method = {params.method!r} does not make FP16; FP16 changes no graph",
                source=source,
                hint="leave method out (auto): TensorRT builds FP16 from the FP32 graph with a builder flag",
            )
        if runtime != "tensorrt":
            raise ConfigError(
                f"quantize.precision = 'fp16' on {where}: ONNX Runtime would run the FP32 graph, and its CPU "
                "provider has no fast FP16 kernels",
                source=source,
                hint="use int8 or int4 for this target, or no quantize stage",
            )
        return
    if precision not in METHOD_PRECISIONS[method]:
        able = [m for m, ps in METHOD_PRECISIONS.items() if precision in ps]
        raise ConfigError(
            f"quantize.method = {method!r} cannot make {precision}",
            source=source,
            hint=f"for {precision} use method {' or '.join(repr(m) for m in able)} (or auto)",
        )
    if runtime == "tensorrt" and method in ("ort-dynamic", "ort-int4"):
        op = "MatMulInteger/DynamicQuantizeLinear" if method == "ort-dynamic" else "MatMulNBits"
        raise ConfigError(
            f"quantize.method = {method!r} writes {op}, which TensorRT cannot run, but {where} runs TensorRT",
            source=source,
            hint=f"use method 'modelopt' (or auto) for {precision} on TensorRT" + (", or 'ort-static' (QDQ)" if precision == "int8" else ""),
        )
    if runtime == "onnxruntime" and method == "modelopt" and precision != "int8":
        raise ConfigError(
            f"quantize.method = 'modelopt' with {precision} exports TensorRT-only ops, but {where} runs ONNX Runtime",
            source=source,
            hint="use method 'ort-int4' (or auto) for int4 on ONNX Runtime" if precision == "int4" else "use a TensorRT target for fp8",
        )
    if params.quantize_attention and method != "ort-static":
        why = {
            "ort-dynamic": "ONNX Runtime's dynamic quantiser only quantises MatMuls with a constant weight",
            "modelopt": "modelopt quantises Linear/Conv layers; the attention matmuls are plain torch.matmul",
        }.get(method, f"{method} is weight-only")
        raise ConfigError(
            f"quantize.quantize_attention = true is not supported by method {method!r}: {why}",
            source=source,
            hint="set quantize_attention = false, or use method 'ort-static' for INT8 attention",
        )
    if params.calibration_samples < 1:
        raise ConfigError(f"quantize.calibration_samples is {params.calibration_samples}; it must be >= 1", source=source,
                          hint=f"e.g. calibration_samples = {Params.__dataclass_fields__['calibration_samples'].default} (its default)")
    if precision == "int4" and (params.block_size < 16 or params.block_size & (params.block_size - 1)):
        raise ConfigError(
            f"quantize.block_size is {params.block_size}; INT4 block sizes are powers of two >= 16",
            source=source,
            hint="32 or 64 for small models, 128 for large ones",
        )
    bad = [p for p in (params.exclude or ()) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ConfigError(f"quantize.exclude holds empty names {bad}", source=source,
                          hint="list module names (prefixes) to keep in full precision, e.g. exclude = [\"expert.action_out\"]")


def _calibration(policy: Policy, ctx: BuildContext, n: int, method: str) -> dict[str, Any]:
    if ctx.calibration is None:
        raise EpisodeError(
            f"quantize method {method!r} calibrates activation ranges and needs calibration episodes",
            source="quantize",
            hint="pass --episodes (a calibration split is drawn from them), or use method 'ort-dynamic'",
        )
    from vlacompile.quantizers import sample_inputs

    return sample_inputs(policy.spec, ctx.calibration, n, seed=ctx.seed)


def _file_bytes(path: Path) -> int:
    from vlacompile.artifact import onnx_files

    return sum(p.stat().st_size for p in onnx_files(path))


def run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact:
    from vlacompile.config_util import to_dict

    t0 = time.perf_counter()
    method = resolve_method(params, ctx.target)
    source = "recipe stage quantize"
    if artifact.precision != "fp32":
        raise ConfigError(
            f"quantize.precision = {params.precision!r}, but the model is already {artifact.precision}",
            source=source,
            hint="use one quantize stage per recipe",
        )
    consumes, _ = kinds(params, ctx.target)
    if params.exclude is None:
        from dataclasses import replace

        from vlacompile.families import get_family

        params = replace(params, exclude=get_family(artifact.policy.family).default_quant_excludes(artifact.policy.config))
    if consumes != artifact.kind:
        raise ConfigError(
            f"quantize method {method!r} needs a {consumes} model but gets a {artifact.kind} one",
            source=source,
            hint="ORT methods and fp16 go after export; modelopt goes before it",
        )
    record: dict[str, Any] = {"stage": "quantize", "params": to_dict(params), "precision": params.precision, "method": method}
    out = Artifact(
        policy=artifact.policy, onnx_path=artifact.onnx_path, precision=params.precision,
        quantized_torch=artifact.quantized_torch, records=list(artifact.records), extra_files=artifact.extra_files,
    )

    if params.precision == "fp16":
        # No graph change: TensorRT's builder makes FP16 kernels from the FP32 graph.
        size = _file_bytes(artifact.onnx_path)
        record.update(
            method="tensorrt-builder-flag", excluded=[], bytes_before=size, bytes_after=size,
            note="recorded for the TensorRT builder (FP16 flag); graph unchanged",
        )
    elif method == "modelopt":
        from vlacompile.quantizers.modelopt import deployed_weight_bytes, quantize_module

        policy = artifact.policy
        calib = _calibration(policy, ctx, params.calibration_samples, method)
        n = len(next(iter(calib.values())))

        names = policy.spec.input_names

        def forward_loop(module):
            import torch

            for i in range(0, n, CALIBRATION_BATCH):
                module(*[torch.from_numpy(calib[k][i : i + CALIBRATION_BATCH]) for k in names])

        ctx.log(f"quantize: modelopt {params.precision}, calibrating on {n} observations")
        qmodule, info = quantize_module(
            policy.module, params.precision, exclude=params.exclude, per_channel=params.per_channel,
            block_size=params.block_size, forward_loop=forward_loop, source=source,
        )
        out.policy = Policy(module=qmodule, config=policy.config, spec=policy.spec, family=policy.family, meta=dict(policy.meta))
        out.quantized_torch = True
        record.update(
            excluded=info["excluded"],
            quantized_layers=info["quantized_layers"],
            calibration_samples=n,
            bytes_before=policy.weight_bytes(),
            bytes_after=deployed_weight_bytes(qmodule, params.precision),
            bytes_basis="weights at the deployed precision (the torch module keeps FP32 weights with quantisers)",
        )
    else:
        from vlacompile.quantizers import ort

        src = artifact.onnx_path
        dst = Path(ctx.workdir) / f"{src.stem}.{params.precision}{src.suffix}"
        ctx.log(f"quantize: {method} {params.precision} {src.name} -> {dst.name}")
        if method == "ort-dynamic":
            info = ort.quantize_dynamic(src, dst, exclude=params.exclude, per_channel=params.per_channel, source=source)
        elif method == "ort-static":
            calib = _calibration(artifact.policy, ctx, params.calibration_samples, method)
            info = ort.quantize_static(
                src, dst, calibration=calib, exclude=params.exclude, per_channel=params.per_channel,
                quantize_attention=params.quantize_attention,
                symmetric=ctx.target.device.runtime == "tensorrt", source=source,
            )
        else:
            info = ort.quantize_int4(src, dst, exclude=params.exclude, block_size=params.block_size, source=source)
        out.onnx_path = dst
        record.update(onnx=dst.name, **info, bytes_before=_file_bytes(src), bytes_after=_file_bytes(dst), bytes_basis="files")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    out.records.append(record)
    ctx.log(f"quantize: {params.precision} via {record['method']}, kept {record['excluded']} in higher precision")
    return out
