"""The split policy: System 2 once per chunk, then K System 1 steps, driven by ``split.json``.

This is the glue a robot stack runs when the two parts are separate graphs (as TensorRT engines
are built). What it does is data in ``split.json`` (this module reads it; the compiler writes it):
the inputs derived from the policy's inputs (the reference family standardises the state), what
System 2 hands System 1 (prefix features, or a per-layer K/V cache), the integrator (Euler over the
recorded times, from t=0 to 1 or from 1 to 0) and the action post-processing. ``SplitProgram``
executes it for any pair of part runners: ONNX Runtime here, TensorRT plans on the device. The
result matches the single graph (and the torch policy) to float32 rounding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlacompile_runtime.errors import CheckpointError

SPLIT_JSON = "split.json"
SPLIT_FORMAT = 2

PartFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def read_split_manifest(directory: str | Path) -> dict[str, Any]:
    """split.json: what System 2 and System 1 read and write, and the glue between them (see
    ``vlacompile.families.base.SplitPlan`` in the compiler). Refuses files of another format version."""
    path = Path(directory) / SPLIT_JSON
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
    if meta.get("format") != SPLIT_FORMAT:
        raise CheckpointError(f"split.json has format {meta.get('format')!r}; this runtime reads format {SPLIT_FORMAT}",
                              source=path, hint="rebuild the artifact with the vlacompile that came with this runtime, or install the runtime that came with its vlacompile")
    missing = [k for k in ("system2", "system1", "integrator", "derived", "post", "batch_size", "inputs") if k not in meta]
    if missing:
        raise CheckpointError(f"split.json lacks {missing}", source=path, hint="re-export the artifact")
    return meta


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
