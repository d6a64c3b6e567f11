"""TensorRT plans: build them on the device, record what they were built with, refuse the wrong one.

A plan runs only on the TensorRT version and GPU architecture it was built with. Every plan is
listed in ``engine.json`` beside it with the TensorRT / CUDA / driver versions, the GPU and its
compute capability, the precision and the plan's sha256; ``load_plan`` compares those with the
device it runs on before deserialising anything. Timing caches are pinned: a given cache file is
read and never rewritten (its sha256 is recorded), so a rebuild picks the same tactics.

Graphs with explicit Q/DQ (modelopt INT8/FP8/INT4 exports) are built as STRONGLY_TYPED networks:
TensorRT then takes every precision from the graph. Precision builder flags without Q/DQ are used
only for FP16/BF16; asking for INT8/FP8/INT4 from a graph without Q/DQ is an error, because the flag
alone silently gives a floating-point engine (DESIGN.md, known traps).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from vlacompile.errors import MissingDependencyError
from vlacompile.trt import GPU_INSTALL_HINT, EngineError

ENGINE_JSON = "engine.json"
FLAG_PRECISIONS = ("fp32", "fp16", "bf16")  # precisions a builder flag gives without Q/DQ in the graph


def import_tensorrt():
    """``tensorrt``, or a MissingDependencyError saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorRT is not installed ({e})", source="tensorrt", hint=GPU_INSTALL_HINT
        ) from None
    return tensorrt


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _jetson_release() -> str | None:
    path = Path("/etc/nv_tegra_release")  # L4T release line on Jetson (JetPack's Linux)
    return path.read_text().splitlines()[0].strip() if path.is_file() else None


def device_info() -> dict[str, Any]:
    """What a plan depends on, for this machine's first GPU."""
    trt = import_tensorrt()
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch is needed to query the CUDA device", source="torch", hint=GPU_INSTALL_HINT) from None
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "no CUDA device is visible: TensorRT plans are built and run on the target's GPU",
            source="cuda",
            hint="run `vlacompile engine` on the device (with a CUDA build of torch); " + GPU_INSTALL_HINT,
        )
    props = torch.cuda.get_device_properties(0)
    return {
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": _driver_version(),
        "l4t": _jetson_release(),
    }


def check_compatible(manifest: dict[str, Any], device: dict[str, Any], source: str | Path) -> None:
    """Raise EngineError when the plan's recorded TensorRT version or compute capability is not the device's."""
    built = manifest.get("device") or {}
    diffs = [
        f"{label} {built.get(key)!s} (this device: {device.get(key)!s})"
        for key, label in (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"))
        if str(built.get(key)) != str(device.get(key))
    ]
    if diffs:
        raise EngineError(
            f"the plan was built for {built.get('gpu', 'another GPU')} with " + " and ".join(diffs)
            + f"; it cannot run on {device.get('gpu', 'this device')}",
            source=source,
            hint="TensorRT plans are tied to one TensorRT version and GPU architecture: rebuild it here with `vlacompile engine`",
        )


def read_engine_manifest(plan_dir: str | Path) -> dict[str, Any]:
    path = Path(plan_dir) / ENGINE_JSON
    if not path.is_file():
        raise EngineError("no engine.json beside the plan", source=path.parent, hint="build the plans with `vlacompile engine`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"engine.json is not valid JSON ({e})", source=path, hint="rebuild the plans with `vlacompile engine`") from None


def has_explicit_quantization(onnx_path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    # QuantizeLinear, DequantizeLinear (weight-only INT4 has only DQ), trt::TRT_FP8*, TRT_FP4*, TRT_MXFP8*
    return any("quantize" in n.op_type.lower() or n.op_type == "TRT_FP4QDQ" for n in model.graph.node)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    precision: str = "fp32",
    timing_cache: str | Path | None = None,
    workspace_mb: int = 4096,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` on this machine's GPU and record it in ``engine.json``
    beside the plan. Returns the plan's entry (with the device description)."""
    from vlacompile.checkpoint import sha256_file

    trt = import_tensorrt()
    device = device_info()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    t0 = time.perf_counter()
    explicit = has_explicit_quantization(onnx_path)
    if not explicit and precision not in FLAG_PRECISIONS:
        raise EngineError(
            f"precision {precision} needs Q/DQ in the graph, and {onnx_path.name} has none: a builder flag alone "
            "gives a floating-point engine",
            source=onnx_path,
            hint="quantise with the modelopt method (the quantize stage before export) for TensorRT targets",
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if explicit else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(
            f"TensorRT {trt.__version__}'s ONNX parser rejected the graph: {'; '.join(errors[:5])}",
            source=onnx_path,
            hint="run the readiness check (vlacompile.trt.readiness.check_readiness) to find the nodes",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if not explicit and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not explicit and precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache_path = Path(timing_cache) if timing_cache else None
    reused = cache_path is not None and cache_path.is_file()
    cache = config.create_timing_cache(cache_path.read_bytes() if reused else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)  # a cache from another device is an error, not a silent miss
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT {trt.__version__} could not build an engine from the graph",
            source=onnx_path,
            hint=f"raise --workspace-mb (now {workspace_mb}) or check the TensorRT log above",
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path is not None and not reused:  # pinned: an existing cache is never rewritten
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    entry = {
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "precision": precision,
        "strongly_typed": explicit,
        "sha256": sha256_file(plan_path),
        "bytes": plan_path.stat().st_size,
        "workspace_mb": workspace_mb,
        "timing_cache": None
        if cache_path is None
        else {"path": str(cache_path), "sha256": sha256_file(cache_path), "reused": reused},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    _record(plan_path, entry, device)
    return {**entry, "device": device}


def _record(plan_path: Path, entry: dict[str, Any], device: dict[str, Any]) -> None:
    path = plan_path.parent / ENGINE_JSON
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if manifest.get("device") and manifest["device"] != device:
        manifest = {}  # plans from another device are stale: this build starts a new manifest
    manifest["device"] = device
    manifest.setdefault("plans", {})[plan_path.name] = entry
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_plan(plan_path: str | Path):
    """Deserialise a plan after checking engine.json against this device and the plan's sha256."""
    from vlacompile.checkpoint import sha256_file

    plan_path = Path(plan_path)
    manifest = read_engine_manifest(plan_path.parent)
    entry = manifest.get("plans", {}).get(plan_path.name)
    if entry is None:
        raise EngineError("engine.json does not list this plan", source=plan_path, hint="rebuild the plans with `vlacompile engine`")
    if sha256_file(plan_path) != entry.get("sha256"):
        raise EngineError("the plan's sha256 differs from the one engine.json records", source=plan_path, hint="rebuild the plans with `vlacompile engine`")
    trt = import_tensorrt()
    check_compatible(manifest, device_info(), plan_path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineError("TensorRT could not deserialise the plan", source=plan_path, hint="rebuild it with `vlacompile engine`")
    return engine


def build_artifact_engines(artifact_dir: str | Path, *, workspace_mb: int = 4096, timing_cache: str | Path | None = None,
                           log=print) -> dict[str, Any]:
    """Plans for every ONNX graph of a built artifact (the single graph, and the split graphs when
    present), after the readiness check against this device's TensorRT version."""
    from vlacompile.trt.readiness import REDUCED_MAX, check_readiness

    from vlacompile.artifact import SPLIT_JSON, read_manifest, read_split_manifest
    from vlacompile.errors import ArtifactError
    from vlacompile.outputs import check_output_file

    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ArtifactError("is not a directory" if artifact_dir.exists() else "no such artifact directory", source=artifact_dir,
                            hint="pass the output directory of `vlacompile build`")
    # Read (and checked) before TensorRT is imported: a damaged manifest is the user's to hear first.
    manifest = read_manifest(artifact_dir, keys=("onnx", "precision"))
    precision = manifest["precision"]
    graphs = [str(manifest["onnx"])]
    if (artifact_dir / SPLIT_JSON).is_file():
        split = read_split_manifest(artifact_dir)
        graphs += [str(split[part]["onnx"]) for part in ("system2", "system1")]
    if timing_cache is not None and not Path(timing_cache).is_file():  # written after the build: check the path now
        check_output_file(timing_cache, option="--timing-cache", example="timing.cache",
                          protected=[("artifact", artifact_dir / g) for g in graphs])
    trt = import_tensorrt()
    missing = [g for g in graphs if not (artifact_dir / g).is_file()]
    if missing:
        raise ArtifactError(f"the graphs {missing} named by manifest.json / split.json are missing", source=artifact_dir,
                            hint="the artifact is incomplete: rebuild it with `vlacompile build`")
    built = {}
    for name in graphs:
        onnx_path = artifact_dir / name
        # Flag-built FP16/BF16 engines hold the graph's float constants in that precision.
        check_readiness(onnx_path, trt.__version__, precisions=(precision,) if precision in REDUCED_MAX else ())
        plan = onnx_path.with_suffix(".plan")
        log(f"engine: {name} -> {plan.name} ({precision})")
        built[plan.name] = build_engine(onnx_path, plan, precision=precision, timing_cache=timing_cache, workspace_mb=workspace_mb)
    return built
