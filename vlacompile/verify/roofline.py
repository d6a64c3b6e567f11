"""The roofline: a lower bound on one ``get_action`` call of a model on a device.

Each part costs at least max(weight bytes / memory bandwidth, FLOPs / peak throughput). System 2
(vision + backbone) runs once per chunk; System 1 (the flow-matching expert) runs at every one of
the K integration steps and re-reads its weights each time, which is why cutting flow steps is the
largest latency lever. Activations, kernel launches and pre-processing are ignored, so a real
latency is always above this bound; how far above says how much the runtime leaves on the table.

Figures for a Jetson or GPU target come from its data sheet (targets/*.toml). A target without a
bandwidth figure (x86-cpu) is the host itself: its bandwidth and throughput are microbenchmarked.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from vlacompile.errors import ConfigError

# Bytes stored per weight. NVFP4 adds one FP8 scale per 16-element block (1/16 byte a weight).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "nvfp4": 0.5 + 1 / 16}

# Where a device lists no peak for a precision, the nearest higher precision it has is used.
PEAK_FALLBACK = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "fp8": ("fp8", "fp16", "bf16", "fp32"),
    "int8": ("int8", "fp16", "bf16", "fp32"),
    "int4": ("int4", "int8", "fp16", "bf16", "fp32"),
    "nvfp4": ("nvfp4", "fp8", "fp16", "bf16", "fp32"),
}


def _fig(value: float, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def policy_weight_bytes(policy) -> dict[str, float]:
    """FP32 bytes (4 a parameter) of the System 2 and System 1 submodules named in the policy's spec.

    Counted at 4 bytes a parameter whatever the torch dtype, so ``estimate`` can rescale them to the
    precision the compiled graph runs at.
    """
    out = {}
    for part, names in (("system2", policy.spec.system2), ("system1", policy.spec.system1)):
        total = 0
        for name in names:
            try:
                module = policy.module.get_submodule(name)
            except AttributeError:
                raise ValueError(f"policy of family {policy.family!r} has no submodule {name!r} (spec.{part})") from None
            total += sum(p.numel() for p in module.parameters())
        out[part] = 4.0 * total
    return out


@functools.lru_cache(maxsize=4)
def measure_host(matmul_n: int = 1024, copy_mb: int = 256, repeats: int = 20) -> dict[str, Any]:
    """Microbenchmark this machine: float32 matmul throughput (all cores) and memory copy bandwidth.

    Best of ``repeats`` (a few warm-up runs are not enough: the BLAS threads and the clock ramp up
    over the first ~10 calls, and a bound from a low peak would not be a bound); copy bandwidth counts bytes read plus bytes written (STREAM's convention).
    Cached per process: verify asks for it for both teacher and student.
    """
    from vlacompile.targets import host_device_string

    rng = np.random.default_rng(0)
    a = rng.standard_normal((matmul_n, matmul_n), dtype=np.float32)
    b = rng.standard_normal((matmul_n, matmul_n), dtype=np.float32)
    a @ b  # warm the BLAS threads
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    gflops = 2.0 * matmul_n**3 / best / 1e9

    n = copy_mb * 1024 * 1024 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(max(3, repeats // 4)))
    bandwidth = 2.0 * src.nbytes / best / 1e9

    device = host_device_string()
    return {
        "device": device,
        "matmul_gflops": gflops,
        "memory_bandwidth_gbs": bandwidth,
        "matmul_n": matmul_n,
        "copy_mb": copy_mb,
        "source": f"measured on {device} (microbenchmark)",
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_for(target, precision: str) -> tuple[float, str]:
    """(dense peak TFLOPS, the precision whose figure it is) from the target's data sheet."""
    have = target.device.peak_tflops
    for p in PEAK_FALLBACK.get(precision, (precision,)):
        if p in have:
            return float(have[p]), p
    raise ConfigError(
        f"device.peak_tflops has no figure for {precision} or any higher precision (has {sorted(have)})",
        source=target.path or target.name,
        hint="add the device's dense peak throughput per precision to the target profile",
    )


def _part(name: str, flops: float, weight_bytes: float, steps: int, bw_gbs: float, peak_tflops: float, source: str) -> dict:
    memory_ms = weight_bytes / (bw_gbs * 1e9) * 1e3
    compute_ms = flops / (peak_tflops * 1e12) * 1e3
    per_step = max(memory_ms, compute_ms)
    return {
        "part": name,
        "steps": steps,
        "weight_bytes": weight_bytes,
        "flops_per_step": flops,
        "memory_ms_per_step": memory_ms,
        "compute_ms_per_step": compute_ms,
        "bound": "memory" if memory_ms >= compute_ms else "compute",
        "ms": _fig(steps * per_step, source),
    }


def estimate(
    flops: dict[str, float],
    weight_bytes: dict[str, float],
    target,
    precision: str,
    host: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Lower bound on one chunk's latency, per part and in total, for ``target`` at ``precision``.

    ``flops``: {"system2", "system1_per_step", "system1"} (a family's ``flops``).
    ``weight_bytes``: {"system2", "system1"} FP32 bytes (``policy_weight_bytes``), rescaled here to
    ``precision``. ``host``: ``measure_host()``, required for a target without a bandwidth figure.
    """
    if precision not in BYTES_PER_WEIGHT:
        raise ConfigError(f"unknown precision {precision!r}", source="roofline", hint=f"known: {sorted(BYTES_PER_WEIGHT)}")
    notes = []
    bpw = BYTES_PER_WEIGHT[precision]
    if target.device.memory_bandwidth_gbs is None:
        if host is None:
            raise ValueError(f"target {target.name} has no data-sheet bandwidth: pass host=measure_host()")
        bw = _fig(host["memory_bandwidth_gbs"], host["source"])
        peak = _fig(host["matmul_gflops"] / 1e3, host["source"])
        peak_precision = "fp32"
        if precision != "fp32":
            notes.append(f"the host's peak is its float32 matmul throughput; no {precision} figure was measured")
        source = f"estimated for {target.name} from figures measured on {host['device']} (microbenchmark)"
    else:
        sheet = f"{target.name} data sheet"
        value, peak_precision = peak_for(target, precision)
        bw = _fig(float(target.device.memory_bandwidth_gbs), sheet)
        peak = _fig(value, sheet if peak_precision == precision else f"{sheet} ({peak_precision} figure: no {precision} figure listed)")
        if peak_precision != precision:
            notes.append(f"{target.name} lists no {precision} peak; its {peak_precision} figure was used")
        source = f"estimated for {target.name} from data-sheet figures"
    per_step = flops.get("system1_per_step") or 0.0
    steps = round(flops["system1"] / per_step) if per_step else 0
    s2 = _part("system2", flops["system2"], weight_bytes["system2"] * bpw / 4, 1, bw["value"], peak["value"], source)
    s1 = _part("system1", per_step, weight_bytes["system1"] * bpw / 4, steps, bw["value"], peak["value"], source)
    total = s2["ms"]["value"] + s1["ms"]["value"]
    return {
        "kind": "estimated",
        "target": target.name,
        "precision": precision,
        "bytes_per_weight": bpw,
        "memory_bandwidth_gbs": bw,
        "peak_tflops": {**peak, "precision": peak_precision},
        "system2": s2,
        "system1": s1,
        "total_ms": _fig(total, source),
        "weight_mb": (s2["weight_bytes"] + s1["weight_bytes"]) / (1024 * 1024),
        "source": source,
        "notes": notes,
    }
