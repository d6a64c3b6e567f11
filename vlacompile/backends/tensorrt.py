"""TensorRT on the device: plans executed with CUDA tensors from torch for I/O.

``tensorrt`` and a CUDA build of torch are imported when a runner is made, never at import time.
Plans are loaded through ``vlacompile.trt.engine.load_plan``, which refuses a plan built for another
TensorRT version or GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlacompile.backends.base import Runner
from vlacompile.policy import PolicySpec


class TrtPlan:
    """One deserialised plan with its execution context, stream and preallocated outputs."""

    def __init__(self, plan_path: str | Path):
        import torch

        from vlacompile.trt.engine import import_tensorrt, load_plan

        trt = import_tensorrt()
        self.torch = torch
        self.engine = load_plan(plan_path)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
            trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool,
        }
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.outputs = {
            n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device="cuda") for n in names if n not in self.inputs
        }
        for n, t in self.outputs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        self.batch = self.shapes[self.inputs[0]][0]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            staged = {}
            for n in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feed[n])).to("cuda", dtype=self.dtypes[n], non_blocking=True)
                staged[n] = t  # keeps the device buffer alive until the stream is done
                self.context.set_tensor_address(n, t.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            out = {n: t.float().cpu() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu() for n, t in self.outputs.items()}
        self.stream.synchronize()
        return {n: t.numpy() for n, t in out.items()}


def _in_batches(batch: int, inputs: dict[str, np.ndarray], fn) -> np.ndarray:
    n = len(inputs["state"])
    outs = []
    for i in range(0, n, batch):
        part = {k: v[i : i + batch] for k, v in inputs.items()}
        m = len(part["state"])
        if m < batch:  # static batch: pad the last slice with its last row
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch - m, axis=0)]) for k, v in part.items()}
        outs.append(fn(part)[:m])
    return np.concatenate(outs)


class TrtRunner(Runner):
    """The single-graph plan (``student.plan``): model inputs -> actions."""

    def __init__(self, plan_path: str | Path, spec: PolicySpec):
        super().__init__(spec)
        self.plan = TrtPlan(plan_path)
        self.name = "tensorrt"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return _in_batches(self.plan.batch, inputs, lambda feed: self.plan.infer(feed)["actions"])


class TrtSplitRunner(Runner):
    """``system2.plan`` once, then ``system1.plan`` K times, with the split export's statistics."""

    def __init__(self, artifact_dir: str | Path, spec: PolicySpec):
        from vlacompile.backends.split import SplitStats, read_split_manifest

        super().__init__(spec)
        artifact_dir = Path(artifact_dir)
        meta = read_split_manifest(artifact_dir)
        self.stats = SplitStats(meta)
        self.system2 = TrtPlan(artifact_dir / Path(meta["system2"]["onnx"]).with_suffix(".plan"))
        self.system1 = TrtPlan(artifact_dir / Path(meta["system1"]["onnx"]).with_suffix(".plan"))
        self.name = "tensorrt-split"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return _in_batches(self.system2.batch, inputs, self._run)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        s2 = self.system2.infer({"images": inputs["images"], "tokens": inputs["tokens"]})
        state_n = self.stats.normalize_state(inputs["state"])

        def velocity(x, t):
            feed = {"x_t": x, "t": t, "state_n": state_n, "prefix": s2["prefix"], "prefix_mask": s2["prefix_mask"]}
            return self.system1.infer(feed)["velocity"]

        return self.stats.integrate(inputs["noise"], velocity)
