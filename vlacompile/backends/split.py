"""The split policy on ONNX Runtime: System 2 once per chunk, then K System 1 steps.

This is the glue a robot stack runs when the two parts are separate graphs (as TensorRT engines
are built): state normalisation, Euler integration and action un-normalisation happen here in
numpy, with the statistics the export wrote to ``split.json``. The result matches the single graph
(and the torch policy) to float32 rounding.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlacompile.backends.base import Runner
from vlacompile.errors import CheckpointError
from vlacompile.policy import PolicySpec

SPLIT_JSON = "split.json"  # as vlacompile.stages.export.SPLIT_JSON (not imported: it pulls the stage)


def read_split_manifest(split_dir: str | Path) -> dict[str, Any]:
    path = Path(split_dir) / SPLIT_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            "no split.json: this artifact has no System 2 / System 1 graphs",
            source=path.parent,
            hint="build with export.split = true in the recipe",
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"split.json is not valid JSON ({e})", source=path, hint="re-export the artifact") from None
    missing = [k for k in ("system2", "system1", "flow_steps", "batch_size", "state_mean", "state_std", "action_mean", "action_std") if k not in meta]
    if missing:
        raise CheckpointError(f"split.json lacks {missing}", source=path, hint="re-export the artifact")
    return meta


class SplitStats:
    """Normalisation and integration constants of a split policy, as float32 arrays."""

    def __init__(self, meta: dict[str, Any]):
        f32 = lambda k: np.asarray(meta[k], dtype=np.float32)
        self.state_mean, self.state_std = f32("state_mean"), f32("state_std")
        self.action_mean, self.action_std = f32("action_mean"), f32("action_std")
        self.flow_steps = int(meta["flow_steps"])

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return ((state.astype(np.float32) - self.state_mean) / self.state_std).astype(np.float32)

    def integrate(self, noise: np.ndarray, velocity) -> np.ndarray:
        """Euler steps from noise (t=0) to actions (t=1), then physical units; ``velocity(x, t)``
        is one System 1 call. Written as the torch module computes it (same float32 ops)."""
        k = self.flow_steps
        x = noise.astype(np.float32)
        for i in range(k):
            t = np.full((x.shape[0],), i / k, dtype=np.float32)
            x = x + velocity(x, t) / np.float32(k)
        return x * self.action_std + self.action_mean


class SplitRunner(Runner):
    """``system2.onnx`` then ``system1.onnx`` K times, on ONNX Runtime."""

    def __init__(self, split_dir: str | Path, spec: PolicySpec, provider: str = "cpu", threads: int | None = None):
        from vlacompile.backends.onnxrt import make_session

        super().__init__(spec)
        self.dir = Path(split_dir)
        self.meta = read_split_manifest(self.dir)
        self.stats = SplitStats(self.meta)
        self.batch = int(self.meta["batch_size"])
        self.system2 = make_session(self.dir / self.meta["system2"]["onnx"], provider, threads)
        self.system1 = make_session(self.dir / self.meta["system1"]["onnx"], provider, threads)
        self.session = self.system2  # what verify's latency code reads the thread count from
        self.name = f"onnxruntime-{provider}-split"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        n = len(inputs["state"])
        if n == self.batch:
            return self._run(inputs)
        # Static-batch graphs: run in slices of the batch, padding the last slice with its last row.
        outs = []
        for i in range(0, n, self.batch):
            part = {k: v[i : i + self.batch] for k, v in inputs.items()}
            m = len(part["state"])
            if m < self.batch:
                part = {k: np.concatenate([v, np.repeat(v[-1:], self.batch - m, axis=0)]) for k, v in part.items()}
            outs.append(self._run(part)[:m])
        return np.concatenate(outs)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        prefix, prefix_mask = self.system2.run(None, {"images": inputs["images"], "tokens": inputs["tokens"]})
        state_n = self.stats.normalize_state(inputs["state"])

        def velocity(x, t):
            feed = {"x_t": x, "t": t, "state_n": state_n, "prefix": prefix, "prefix_mask": prefix_mask}
            return self.system1.run(None, feed)[0]

        return self.stats.integrate(inputs["noise"], velocity)


def _random_feed(shapes: dict[str, list[int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for name, shape in shapes.items():
        if name == "images":
            feed[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif name == "tokens":
            feed[name] = rng.integers(3, 200, shape, dtype=np.int64)
        elif name == "t":
            feed[name] = rng.random(shape, dtype=np.float32)
        else:
            feed[name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def time_parts(
    split_dir: str | Path, *, calls: int = 100, warmup: int = 10, provider: str = "cpu", threads: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Warm latency of System 2 and of one System 1 step, each timed alone with ONNX Runtime on this
    host (inputs: System 2's real outputs feed System 1). ``chunk_ms_p50`` = System 2 + K steps."""
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
    feed2 = _random_feed(meta["system2"]["inputs"], rng)
    prefix, prefix_mask = s2.run(None, feed2)
    feed1 = {**_random_feed({k: v for k, v in meta["system1"]["inputs"].items() if not k.startswith("prefix")}, rng),
             "prefix": prefix, "prefix_mask": prefix_mask}

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
    k = int(meta["flow_steps"])
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
