"""The split policy on ONNX Runtime (``SplitRunner``) and the per-part timing verify reports.

The glue between System 2 and System 1 is data in ``split.json`` (``vlacompile.families.base.SplitPlan``
writes it); the runtime executes it (``vlacompile_runtime.split.SplitProgram``, re-exported here),
for any pair of part runners: ONNX Runtime here, TensorRT plans on the device.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from vlacompile_runtime.policy import SplitGraphs
from vlacompile_runtime.split import PartFn, SplitProgram, apply_ops, read_split_manifest  # noqa: F401  (re-exported)

from vlacompile.backends.base import Runner
from vlacompile.policy import PolicySpec


class SplitRunner(Runner):
    """``system2.onnx`` then ``system1.onnx`` K times, on ONNX Runtime: the runtime's ``SplitGraphs``
    (what ``vlacompile_runtime.load(..., graph="split")`` runs)."""

    def __init__(self, split_dir: str | Path, spec: PolicySpec, provider: str = "cpu", threads: int | None = None):
        super().__init__(spec)
        self.dir = Path(split_dir)
        self.meta = read_split_manifest(self.dir)
        self.graphs = SplitGraphs(self.dir, self.meta, provider, threads)
        self.program, self.batch = self.graphs.program, self.graphs.batch
        self.system2, self.system1 = self.graphs.system2, self.graphs.system1
        self.session = self.system2  # what verify's latency code reads the thread count from
        self.name = f"onnxruntime-{provider}-split"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.graphs(inputs)


def _random_feed(shapes: dict[str, list[int]], dtypes: dict[str, str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for name, shape in shapes.items():
        dtype = dtypes.get(name, "float32")
        if dtype == "uint8":
            feed[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dtype == "int64":
            feed[name] = rng.integers(3, 200, shape, dtype=np.int64)
        elif dtype == "bool":
            feed[name] = np.ones(shape, dtype=bool)
        elif name == "t":
            feed[name] = rng.random(shape, dtype=np.float32)
        else:
            feed[name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def _input_dtypes(session) -> dict[str, str]:
    kinds = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(float)": "float32"}
    return {i.name: kinds.get(i.type, "float32") for i in session.get_inputs()}


def time_parts(
    split_dir: str | Path, *, calls: int = 100, warmup: int = 10, provider: str = "cpu", threads: int | None = None, seed: int = 0,
    feeds: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Warm latency of System 2 and of one System 1 step, each timed alone with ONNX Runtime on this
    host (System 2's real outputs feed System 1). ``feeds``: the policy's inputs (one static batch) to
    time with; random ones otherwise. ``chunk_ms_p50`` = System 2 + K steps."""
    from vlacompile.backends.onnxrt import make_session
    from vlacompile.targets import host_device_string
    from vlacompile.verify.latency import summarize_ms

    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    split_dir = Path(split_dir)
    meta = read_split_manifest(split_dir)
    rng = np.random.default_rng(seed)
    s2 = make_session(split_dir / meta["system2"]["onnx"], provider, threads)
    s1 = make_session(split_dir / meta["system1"]["onnx"], provider, threads)
    values: dict[str, np.ndarray] = {}
    if feeds is not None:
        values.update(feeds)
        for d in meta["derived"]:
            values[d["output"]] = apply_ops(values[d["input"]], d["ops"])
    s2_in = meta["system2"]["inputs"]
    feed2 = {**_random_feed({k: v for k, v in s2_in.items() if k not in values}, _input_dtypes(s2), rng),
             **{k: values[k] for k in s2_in if k in values}}
    carry = dict(zip(meta["system2"]["output_names"], s2.run(None, feed2), strict=True))
    s1_in = meta["system1"]["inputs"]
    feed1 = {**_random_feed({k: v for k, v in s1_in.items() if k not in carry and k not in values}, _input_dtypes(s1), rng),
             **{k: values[k] for k in s1_in if k in values and k not in carry}, **{k: carry[k] for k in s1_in if k in carry}}
    integ = meta["integrator"]
    if integ["t"] in feed1:
        feed1[integ["t"]] = np.full(feed1[integ["t"]].shape, integ["times"][0], dtype=np.float32)

    def timed(session, feed) -> dict[str, float]:
        for _ in range(warmup):
            session.run(None, feed)
        ms = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            ms.append((time.perf_counter_ns() - t0) / 1e6)
        return summarize_ms(ms)

    system2, step = timed(s2, feed2), timed(s1, feed1)
    k = len(integ["times"])
    return {
        "kind": "measured",
        "measured_on": host_device_string(),
        "runtime": f"onnxruntime-{provider}",
        "threads": int(s2.get_session_options().intra_op_num_threads),
        "calls": calls,
        "batch_size": int(meta["batch_size"]),
        "system2": system2,
        "system1_step": step,
        "flow_steps": k,
        "chunk_ms_p50": system2["p50_ms"] + k * step["p50_ms"],
        "system1_share_p50": k * step["p50_ms"] / (system2["p50_ms"] + k * step["p50_ms"]),
    }
