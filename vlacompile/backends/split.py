"""The split policy: System 2 once per chunk, then K System 1 steps, driven by ``split.json``.

This is the glue a robot stack runs when the two parts are separate graphs (as TensorRT engines
are built). What it does is data in ``split.json`` (``vlacompile.families.base.SplitPlan``): the
inputs derived from the policy's inputs (the reference family standardises the state), what System
2 hands System 1 (prefix features, or a per-layer K/V cache), the integrator (Euler over the
recorded times, from t=0 to 1 or from 1 to 0) and the action post-processing. ``SplitProgram``
executes it for any pair of part runners: ONNX Runtime here, TensorRT plans on the device. The
result matches the single graph (and the torch policy) to float32 rounding.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlacompile.artifact import read_split_manifest
from vlacompile.backends.base import Runner, in_static_batches
from vlacompile.policy import PolicySpec

PartFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _op(x: np.ndarray, op: dict[str, Any]) -> np.ndarray:
    if op["op"] == "slice":
        return x[..., : op["stop"]]
    v = np.asarray(op["value"], dtype=np.float32)
    if op["op"] == "add":
        return x + v
    if op["op"] == "sub":
        return x - v
    if op["op"] == "mul":
        return x * v
    if op["op"] == "div":
        return x / v
    raise ValueError(f"split.json names an unknown op {op['op']!r}")


def apply_ops(x: np.ndarray, ops: list[dict[str, Any]]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    for op in ops:
        x = _op(x, op).astype(np.float32, copy=False)
    return x


class SplitProgram:
    """split.json's glue, run with two part functions (feed dict -> outputs in the part's output order)."""

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.integrator = meta["integrator"]
        if self.integrator.get("kind") != "euler":
            raise ValueError(f"split.json integrator {self.integrator.get('kind')!r} is not one this runner executes (euler)")
        self.times = [np.float32(t) for t in self.integrator["times"]]
        self.update = self.integrator["update"]

    @property
    def flow_steps(self) -> int:
        return len(self.times)

    def run(self, inputs: dict[str, np.ndarray], system2: PartFn, system1: PartFn) -> np.ndarray:
        m = self.meta
        values: dict[str, np.ndarray] = dict(inputs)
        for d in m["derived"]:
            values[d["output"]] = apply_ops(values[d["input"]], d["ops"])
        s2 = m["system2"]
        outs = system2({k: values[k] for k in s2["inputs"]})
        values.update(zip(s2["output_names"], outs, strict=True))
        integ = self.integrator
        x = np.asarray(values[integ["init"]], dtype=np.float32)
        n = x.shape[0]
        step = np.float32(self.update["value"])
        s1 = m["system1"]
        for t in self.times:
            values[integ["x"]] = x
            values[integ["t"]] = np.full((n,), t, dtype=np.float32)
            v = system1({k: values[k] for k in s1["inputs"]})[s1["output_names"].index(integ["velocity"])]
            # Written as the torch module computes it (same float32 ops).
            x = x + v / step if self.update["op"] == "div" else x + v * step
        return apply_ops(x, m["post"])


class SplitRunner(Runner):
    """``system2.onnx`` then ``system1.onnx`` K times, on ONNX Runtime."""

    def __init__(self, split_dir: str | Path, spec: PolicySpec, provider: str = "cpu", threads: int | None = None):
        from vlacompile.backends.onnxrt import make_session

        super().__init__(spec)
        self.dir = Path(split_dir)
        self.meta = read_split_manifest(self.dir)
        self.program = SplitProgram(self.meta)
        self.batch = int(self.meta["batch_size"])
        self.system2 = make_session(self.dir / self.meta["system2"]["onnx"], provider, threads)
        self.system1 = make_session(self.dir / self.meta["system1"]["onnx"], provider, threads)
        self.session = self.system2  # what verify's latency code reads the thread count from
        self.name = f"onnxruntime-{provider}-split"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return in_static_batches(self.batch, inputs, self._run)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.program.run(inputs, lambda feed: self.system2.run(None, feed), lambda feed: self.system1.run(None, feed))


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
