"""Split export: System 2 once + K System 1 steps, run in order with ONNX Runtime, give the single
graph's (and torch's) actions; the INT8 (modelopt Q/DQ) split graphs too; per-part latency."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import make_tiny_policy

from vlacompile.backends.onnxrt import OrtRunner
from vlacompile.backends.split import SplitRunner, read_split_manifest, time_parts
from vlacompile.backends.torch_eager import TorchRunner
from vlacompile.errors import CheckpointError
from vlacompile.quantizers import sample_inputs
from vlacompile.stages import Artifact, BuildContext
from vlacompile.stages import export as export_stage
from vlacompile.stages import quantize as quantize_stage
from vlacompile.stages.export import SPLIT_NAMES, ExportError, Params, export_split
from vlacompile.targets import load_target

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def policy(tiny_config, tiny_episode_set):
    return make_tiny_policy(tiny_config, tiny_episode_set)


@pytest.fixture(scope="module")
def inputs(policy, tiny_episode_set):
    return sample_inputs(policy.spec, tiny_episode_set, 10, seed=3)


@pytest.fixture(scope="module")
def exported(policy, tiny_episode_set, tmp_path_factory) -> Artifact:
    ctx = BuildContext(
        target=load_target("x86-cpu"), workdir=tmp_path_factory.mktemp("split"), teacher=policy,
        calibration=tiny_episode_set, log=lambda msg: None,
    )
    return export_stage.run(Artifact(policy=policy), Params(split=True), ctx)


def shapes(path) -> dict[str, tuple[int, ...]]:
    g = onnx.load(str(path)).graph
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim) for v in [*g.input, *g.output]}


def test_split_graphs_have_the_documented_static_interface(exported, policy):
    cfg, spec = policy.config, policy.spec
    workdir = exported.onnx_path.parent
    s2, s1 = shapes(workdir / SPLIT_NAMES["system2"]), shapes(workdir / SPLIT_NAMES["system1"])
    n_prefix = len(cfg.cameras) * cfg.num_patches + cfg.max_tokens
    assert s2 == {
        "images": spec.input_shapes(1)["images"], "tokens": (1, cfg.max_tokens),
        "prefix": (1, n_prefix, cfg.backbone_width), "prefix_mask": (1, 1, 1, n_prefix),
    }
    assert s1 == {
        "x_t": (1, cfg.chunk_size, cfg.action_dim), "t": (1,), "state_n": (1, cfg.state_dim),
        "prefix": (1, n_prefix, cfg.backbone_width), "prefix_mask": (1, 1, 1, n_prefix),
        "velocity": (1, cfg.chunk_size, cfg.action_dim),
    }
    meta = json.loads((workdir / "split.json").read_text())
    assert meta["flow_steps"] == spec.flow_steps and meta["batch_size"] == 1 and meta["format"] == 2
    # The glue is data: standardise the state, Euler from t=0 (x += v / K), un-standardise the actions.
    (derived,) = meta["derived"]
    assert (derived["input"], derived["output"]) == ("state", "state_n")
    np.testing.assert_array_equal(np.float32(derived["ops"][0]["value"]), policy.module.state_mean.numpy())
    integ = meta["integrator"]
    assert integ["times"] == [i / spec.flow_steps for i in range(spec.flow_steps)] and integ["update"] == {"op": "div", "value": spec.flow_steps}
    assert meta["post"][0]["op"] == "mul"
    np.testing.assert_array_equal(np.float32(meta["post"][0]["value"]), policy.module.action_std.numpy())
    rec = exported.records[-1]["split"]
    assert rec["compared_against"] == "torch fp32" and rec["max_abs_diff"] < 1e-5
    assert set(rec["files"]) == {"system2.onnx", "system1.onnx", "split.json"}


def test_split_runner_matches_single_graph_and_torch(exported, policy, inputs):
    split = SplitRunner(exported.onnx_path.parent, policy.spec, threads=1).run_batched(inputs)
    single = OrtRunner(exported.onnx_path, policy.spec, threads=1).run_batched(inputs)
    eager = TorchRunner(policy).run_batched(inputs)
    assert split.shape == (10, policy.spec.chunk_size, policy.spec.action_dim)
    np.testing.assert_allclose(split, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(split, eager, atol=1e-5, rtol=0)
    # The integration really runs K steps: the noise alone does not give these actions.
    assert np.abs(split - (inputs["noise"] * policy.module.action_std.numpy() + policy.module.action_mean.numpy())).max() > 1e-2


def test_split_runner_handles_a_static_batch_larger_than_one(policy, inputs, tmp_path):
    export_split(policy, tmp_path, batch_size=4)
    assert shapes(tmp_path / "system1.onnx")["x_t"][0] == 4
    got = SplitRunner(tmp_path, policy.spec, threads=1).run(inputs)  # 10 = 4 + 4 + 2 (padded)
    np.testing.assert_allclose(got, TorchRunner(policy).run(inputs), atol=1e-5, rtol=0)


def test_int8_split_graphs_carry_qdq_and_match_the_fake_quant_model(policy, tiny_episode_set, inputs, tmp_path):
    ctx = BuildContext(target=load_target("jetson-thor"), workdir=tmp_path, teacher=policy, calibration=tiny_episode_set, log=lambda m: None)
    art = quantize_stage.run(Artifact(policy=policy), quantize_stage.Params(precision="int8", calibration_samples=16), ctx)
    art = export_stage.run(art, Params(split=True), ctx)
    rec = art.records[-1]["split"]
    assert rec["exporter"] == "torchscript" and rec["compared_against"] == "torch fake-quant" and rec["rel_rms"] < 0.02
    for part in SPLIT_NAMES.values():
        assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(tmp_path / part)).graph.node), part
    got = SplitRunner(tmp_path, policy.spec, threads=1).run_batched(inputs)
    single = OrtRunner(art.onnx_path, policy.spec, threads=1).run_batched(inputs)
    rel = np.sqrt(np.mean((got - single) ** 2)) / np.sqrt(np.mean(single**2))
    assert rel < 0.02


def test_time_parts_times_system2_and_one_system1_step(exported):
    t = time_parts(exported.onnx_path.parent, calls=20, warmup=2, threads=1)
    assert t["kind"] == "measured" and t["flow_steps"] == 4 and t["threads"] == 1
    assert t["system2"]["p50_ms"] > 0 and t["system1_step"]["p50_ms"] > 0
    assert t["chunk_ms_p50"] == pytest.approx(t["system2"]["p50_ms"] + 4 * t["system1_step"]["p50_ms"])


def test_missing_split_manifest_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="export.split = true") as e:
        read_split_manifest(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_a_module_without_prefix_and_velocity_cannot_be_split(policy, tmp_path):
    import torch

    from vlacompile.policy import Policy

    plain = Policy(module=torch.nn.Linear(2, 2), config=policy.config, spec=policy.spec, family="other")
    with pytest.raises(ExportError, match="export.split = false"):
        export_split(plain, tmp_path)
