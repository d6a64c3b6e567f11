"""TensorRT on the device: plans executed with CUDA tensors from torch for I/O.

``tensorrt`` and a CUDA build of torch are imported when a runner is made, never at import time.
Plans are loaded through ``vlacompile.trt.engine.load_plan``, which refuses a plan built for another
TensorRT version or GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlacompile.backends.base import Runner, in_static_batches
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


class TrtRunner(Runner):
    """The single-graph plan (``student.plan``): model inputs -> actions."""

    def __init__(self, plan_path: str | Path, spec: PolicySpec):
        super().__init__(spec)
        self.plan = TrtPlan(plan_path)
        self.name = "tensorrt"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return in_static_batches(self.plan.batch, inputs, lambda feed: self.plan.infer(feed)["actions"])


class TrtSplitRunner(Runner):
    """``system2.plan`` once, then ``system1.plan`` K times, driven by the artifact's split.json."""

    def __init__(self, artifact_dir: str | Path, spec: PolicySpec):
        from vlacompile.artifact import read_split_manifest
        from vlacompile.backends.split import SplitProgram

        super().__init__(spec)
        artifact_dir = Path(artifact_dir)
        self.meta = read_split_manifest(artifact_dir)
        self.program = SplitProgram(self.meta)
        self.system2 = TrtPlan(artifact_dir / Path(self.meta["system2"]["onnx"]).with_suffix(".plan"))
        self.system1 = TrtPlan(artifact_dir / Path(self.meta["system1"]["onnx"]).with_suffix(".plan"))
        self.name = "tensorrt-split"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return in_static_batches(self.system2.batch, inputs, self._run)

    @staticmethod
    def _part(plan: TrtPlan, names: list[str]):
        return lambda feed: [plan.infer(feed)[n] for n in names]

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        m = self.meta
        return self.program.run(inputs, self._part(self.system2, m["system2"]["output_names"]),
                                self._part(self.system1, m["system1"]["output_names"]))
