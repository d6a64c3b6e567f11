"""Target profiles (targets/*.toml): a device's facts and a robot's budgets.

Facts (bandwidth, peak throughput per precision, supported precisions, TensorRT/JetPack) feed the
roofline estimate and recipe legality; budgets (control rate, actions executed per chunk, p99 latency,
memory, accuracy tolerances) are the gates verify judges against.
"""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlacompile.config_util import from_dict, read_toml, resolve_toml, to_dict
from vlacompile.errors import ConfigError
from vlacompile.resources import TARGETS_DIR

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "nvfp4")


@dataclass(frozen=True)
class DeviceFacts:
    kind: Literal["cpu", "jetson", "gpu"]
    runtime: Literal["onnxruntime", "tensorrt"]
    name: str
    precisions: tuple[str, ...]
    memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None  # None: measured on the host at verify time
    peak_tflops: dict[str, float] = field(default_factory=dict)  # dense, per precision
    gpu_arch: str | None = None
    compute_capability: str | None = None
    tensorrt: str | None = None
    jetpack: str | None = None
    cuda: str | None = None
    power_w: str | None = None
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Budget:
    control_hz: float  # the robot's control loop rate
    actions_per_chunk: int  # actions executed from each chunk before the next one is used
    execution: Literal["async", "sync"]  # which latency model gates (see DESIGN.md: budget semantics)
    p99_latency_ms: float  # limit on the p99 of one get_action call
    memory_mb: float | None = None  # limit on peak resident memory of the policy process

    @property
    def async_deadline_ms(self) -> float:
        """An asynchronous controller needs the next chunk within n/f seconds."""
        return 1000.0 * self.actions_per_chunk / self.control_hz


@dataclass(frozen=True)
class AccuracyTolerance:
    max_nmse: float  # NMSE vs teacher, normalised by the teacher's per-dimension action variance
    min_cosine: float  # mean cosine similarity of flattened action chunks
    max_abs_error: float | None = None  # worst per-dimension absolute error, physical units
    min_worst_cosine: float | None = None  # cosine of the worst held-out sample (no gate when unset)


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    default_recipe: str
    device: DeviceFacts
    budget: Budget
    accuracy: AccuracyTolerance
    path: str = ""

    @property
    def runs_on_host(self) -> bool:
        """Whether latency can be measured here rather than estimated from the target's specs."""
        return self.device.kind == "cpu" and self.device.runtime == "onnxruntime"

    def supports(self, precision: str) -> bool:
        return precision in self.device.precisions

    def to_dict(self) -> dict:
        return to_dict(self)

    def validate(self) -> None:
        src = self.path or self.name
        bad = [p for p in self.device.precisions if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"unknown precision(s) {bad} in device.precisions", source=src, hint=f"known: {list(PRECISIONS)}")
        for key in ("memory_gb", "memory_bandwidth_gbs"):
            value = getattr(self.device, key)
            if value is not None and not _positive(value):
                raise ConfigError(f"device.{key} must be a positive number, got {value}", source=src,
                                  hint=f"give the device's data-sheet figure, or leave {key} out")
        b = self.budget
        if not _positive(b.control_hz):
            raise ConfigError(f"budget.control_hz must be positive, got {b.control_hz}", source=src,
                              hint="set the robot's control rate in Hz, e.g. control_hz = 50")
        if b.actions_per_chunk < 1:
            raise ConfigError(f"budget.actions_per_chunk must be at least 1, got {b.actions_per_chunk}", source=src,
                              hint="set how many actions of each chunk the robot executes before re-planning, e.g. 8")
        if not _positive(b.p99_latency_ms):
            raise ConfigError(
                f"budget.p99_latency_ms must be positive, got {b.p99_latency_ms}: no model can meet it",
                source=src,
                hint="set the p99 latency your controller can tolerate, in milliseconds",
            )
        if b.execution == "async" and b.p99_latency_ms > b.async_deadline_ms:
            raise ConfigError(
                f"budget.p99_latency_ms={b.p99_latency_ms} exceeds the asynchronous deadline "
                f"{b.async_deadline_ms:.1f} ms (actions_per_chunk / control_hz)",
                source=src,
                hint="lower p99_latency_ms or execute more actions per chunk",
            )
        if b.memory_mb is not None and not _positive(b.memory_mb):
            raise ConfigError(f"budget.memory_mb must be positive, got {b.memory_mb}", source=src,
                              hint="set the memory the policy may use in MB, or leave memory_mb out")
        a = self.accuracy
        if not _positive(a.max_nmse):
            raise ConfigError(f"accuracy.max_nmse must be positive, got {a.max_nmse}: no model can meet it", source=src,
                              hint="e.g. max_nmse = 0.05 (the README's 'Accuracy tolerances' says how to choose it)")
        if not (-1.0 <= a.min_cosine <= 1.0):
            raise ConfigError(f"accuracy.min_cosine must lie in [-1, 1], got {a.min_cosine}", source=src, hint="e.g. min_cosine = 0.95")
        if a.min_worst_cosine is not None and not (-1.0 <= a.min_worst_cosine <= 1.0):
            raise ConfigError(f"accuracy.min_worst_cosine must lie in [-1, 1], got {a.min_worst_cosine}", source=src,
                              hint="e.g. min_worst_cosine = 0.0, or leave it out")
        if a.max_abs_error is not None and not _positive(a.max_abs_error):
            raise ConfigError(f"accuracy.max_abs_error must be positive, got {a.max_abs_error}", source=src,
                              hint="give it in the robot's action units, or leave it out")
        for prec, tflops in self.device.peak_tflops.items():
            if prec not in PRECISIONS or not _positive(tflops):
                raise ConfigError(f"device.peak_tflops.{prec}={tflops} is not a positive figure for a known precision", source=src,
                                  hint=f"precisions: {list(PRECISIONS)}; figures from the device's data sheet")


def _positive(x: float) -> bool:
    # TOML accepts nan and inf; neither is a usable budget or device figure.
    return math.isfinite(x) and x > 0


def list_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def parse_target(data: dict, source: str | Path) -> TargetProfile:
    target = from_dict(TargetProfile, {**data, "path": str(source)}, source)
    target.validate()
    return target


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A target by name (targets/<name>.toml) or by path to a TOML file."""
    path = resolve_toml(name_or_path, TARGETS_DIR, what="target", option="--target")
    return parse_target(read_toml(path), path)


def host_device_string() -> str:
    """A description of this machine for 'measured on ...' labels."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu} ({threads} cores, {platform.system()} {platform.machine()})"
