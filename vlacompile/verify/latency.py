"""Latency of the whole ``get_action`` call, and the control rate it sustains under a target's budget.

What is timed is what a robot's control loop calls: pre-processing (image layout, tokens, batching)
plus inference, batch of one, warm. Percentiles use the nearest-rank definition, so every reported
figure is a latency that was actually observed (p99 of 200 calls is the 198th fastest).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the runners import torch; timing code does not need it
    from vlacompile.backends.base import Observation, Runner


def _nearest_rank(sorted_ms: list[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ms)))
    return sorted_ms[rank - 1]


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (all of it: teacher, data and runtimes together)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    except (ImportError, OSError):
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)


def _runner_threads(runner: Runner) -> int | None:
    """Intra-op threads the runtime uses: the latency depends on it, so the report says it."""
    session = getattr(runner, "session", None)
    if session is not None:
        n = session.get_session_options().intra_op_num_threads
        if n:
            return int(n)
        from vlacompile.backends.onnxrt import default_threads

        return default_threads()
    torch = sys.modules.get("torch")
    if torch is not None and getattr(runner, "policy", None) is not None:
        return int(torch.get_num_threads())
    return getattr(runner, "threads", None)


def summarize_ms(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    return {
        "p50_ms": _nearest_rank(s, 50),
        "p90_ms": _nearest_rank(s, 90),
        "p99_ms": _nearest_rank(s, 99),
        "max_ms": s[-1],
        "mean_ms": float(np.mean(s)),
    }


CLOCK = "time.perf_counter_ns (monotonic, ns)"


def summarize_with_intervals(samples_ms: list[float], seed: int = 0) -> dict[str, Any]:
    """summarize_ms plus a seeded 95% bootstrap interval on p50, p90 and p99."""
    from vlacompile.verify.stats import bootstrap_percentile

    out: dict[str, Any] = summarize_ms(samples_ms)
    out["intervals"] = {f"p{q}_ms": list(bootstrap_percentile(samples_ms, q, seed=seed)) for q in (50, 90, 99)}
    out["interval_method"] = "95% percentile bootstrap over the timed calls (2000 resamples, seeded)"
    return out


def measure_interleaved(
    runners: dict[str, Runner],
    observations: list[Observation],
    noises: list[np.ndarray],
    *,
    calls: int = 200,
    warmup: int = 20,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time several runners on the same inputs, alternating call by call (A/B/A/B ...): a machine that
    drifts (thermal, a neighbour's job) slows them alike, so their ratio survives it. Each result is
    what ``measure_latency`` returns, with intervals and the harness that measured it."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    if not observations or not noises:
        raise ValueError("timing needs at least one observation and one noise sample")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for i in range(warmup):
        for r in runners.values():
            r.get_action(observations[i % len(observations)], noises[i % len(noises)])
    samples_ns: dict[str, list[int]] = {name: [] for name in runners}
    steps = range(calls)
    if progress:
        from tqdm.auto import tqdm

        label = " / ".join(runners) + (", interleaved" if len(runners) > 1 else "")
        steps = tqdm(steps, desc=f"latency ({label})", unit="call", leave=False)
    clock = time.perf_counter_ns
    for i in steps:
        obs, noise = observations[i % len(observations)], noises[i % len(noises)]
        order = list(runners.items()) if i % 2 == 0 else list(runners.items())[::-1]  # A/B, then B/A
        for name, r in order:
            t0 = clock()
            r.get_action(obs, noise)
            samples_ns[name].append(clock() - t0)
    out = {}
    for name, r in runners.items():
        samples_ms = [ns / 1e6 for ns in samples_ns[name]]
        out[name] = {
            **summarize_with_intervals(samples_ms),
            "calls": calls,
            "warmup": warmup,
            "samples_ms": samples_ms,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_scope": "whole verify process (teacher, episodes and both runtimes included): an upper bound",
            "threads": _runner_threads(r),
            "host_load_1min": load,
            "harness": {"clock": CLOCK, "warmup_calls": warmup, "timed_calls": calls, "batch": 1,
                        "threads": _runner_threads(r), "interleaved_with": [n for n in runners if n != name],
                        "order": "alternating A/B, B/A per call", "timed": "get_action: pre-processing + inference"},
        }
    return out


def measure_latency(
    runner: Runner,
    observations: list[Observation],
    noises: list[np.ndarray],
    *,
    calls: int = 200,
    warmup: int = 20,
    progress: bool = False,
    desc: str = "latency",
) -> dict[str, Any]:
    """Time ``runner.get_action(obs, noise)`` ``calls`` times after ``warmup`` untimed calls.

    Observations and noises are cycled through, so caches see a realistic stream of inputs.
    """
    return measure_interleaved({desc: runner}, observations, noises, calls=calls, warmup=warmup, progress=progress)[desc]


# Runs in a fresh interpreter that imports only numpy and onnxruntime, as a deployed policy process
# would: its peak RSS is the student's own memory, not the verify process's (which also holds the
# teacher, torch and whatever distillation left behind).
_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort

def peak_kib():
    # VmHWM: this address space's high-water mark. ru_maxrss would not do: on Linux it carries the
    # parent's peak over fork + exec, so the child would report the verify process's memory.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)

args = json.loads(sys.argv[1])
baseline = peak_kib()
so = ort.SessionOptions()
so.intra_op_num_threads = args["threads"]
session = ort.InferenceSession(args["onnx"], so, providers=args["providers"])
names = {i.name for i in session.get_inputs()}
with np.load(args["inputs"]) as data:
    feed = {k: data[k] for k in data.files if k in names}
for _ in range(args["calls"]):
    session.run(None, feed)
print("PEAK=" + json.dumps([baseline, peak_kib()]))
"""


def measure_process_memory(
    onnx_path, inputs: dict[str, np.ndarray], *, providers: list[str], threads: int, calls: int = 5, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Peak resident memory of a fresh process that loads the ONNX graph and runs it on ``inputs``
    (one pre-processed observation). Linux/macOS only (``resource``); raises RuntimeError on failure.
    """
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "inputs.npz")
        np.savez(npz, **inputs)
        args = {"onnx": str(onnx_path), "inputs": npz, "providers": providers, "threads": threads, "calls": calls}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, json.dumps(args)], capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK=")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    baseline_kib, peak_kib = json.loads(lines[-1][len("PEAK="):])
    return {
        "peak_rss_mb": peak_kib / 1024,
        "baseline_rss_mb": baseline_kib / 1024,  # python + numpy + onnxruntime before the graph is loaded
        "scope": "a fresh process running only the student graph (python, numpy, onnxruntime, the session)",
    }


def control_rate(p99_ms: float, budget: Any, *, source: str | None = None) -> dict[str, Any]:
    """What a p99 latency means for a chunked controller (see DESIGN.md, budget semantics).

    With control rate f and n actions executed per chunk:
    - async: the next chunk is computed while the current one executes, so it is due within n/f;
      the highest control rate this latency sustains is n / p99.
    - sync: the robot stops while it waits for each chunk, so a chunk takes n/f + p99 and the
      effective control rate drops to n / (n/f + p99); the stall per chunk is p99.
    Both are reported; ``gating`` names the one the target's ``execution`` selects.
    """
    f, n = float(budget.control_hz), int(budget.actions_per_chunk)
    chunk_s = n / f
    p99_s = p99_ms / 1000.0
    deadline_ms = 1000.0 * chunk_s
    effective_hz = n / (chunk_s + p99_s)
    return {
        "p99_ms": p99_ms,
        "source": source,
        "control_hz": f,
        "actions_per_chunk": n,
        "execution": budget.execution,
        "gating": budget.execution,
        "async": {
            "deadline_ms": deadline_ms,
            "met": p99_ms <= deadline_ms,
            "slack_ms": deadline_ms - p99_ms,
            "max_control_hz": n / p99_s if p99_s > 0 else math.inf,
        },
        "sync": {
            "effective_control_hz": effective_hz,
            "stall_ms_per_chunk": p99_ms,
            "slowdown": f / effective_hz,  # how much longer the task takes than at the nominal rate
        },
    }
