"""export: static-shape ONNX that ORT runs like torch, deterministic bytes, clear failures."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_policy

from vlacompile.backends.onnxrt import OrtRunner
from vlacompile.backends.torch_eager import TorchRunner
from vlacompile.errors import ConfigError
from vlacompile.quantizers import node_module, sample_inputs
from vlacompile.stages import Artifact, BuildContext
from vlacompile.stages import export as export_stage
from vlacompile.stages.export import ExportError, Params, export_policy, save_onnx
from vlacompile.targets import load_target

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def policy(tiny_config, tiny_episode_set):
    return make_tiny_policy(tiny_config, tiny_episode_set)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, policy, tiny_episode_set):
    return BuildContext(
        target=load_target("x86-cpu"), workdir=tmp_path_factory.mktemp("build"), teacher=policy,
        calibration=tiny_episode_set, log=lambda msg: None,
    )


@pytest.fixture(scope="module")
def exported(policy, ctx) -> Artifact:
    return export_stage.run(Artifact(policy=policy), Params(), ctx)


@pytest.fixture(scope="module")
def inputs(policy, tiny_episode_set):
    return sample_inputs(policy.spec, tiny_episode_set, 12, seed=7)


def test_exported_graph_runs_in_ort_like_torch(exported, policy, inputs):
    path = exported.onnx_path
    assert path.name == "student.onnx" and path.is_file()
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images", "state", "tokens", "noise"] and [o.name for o in graph.output] == ["actions"]
    want = policy.spec.input_shapes(1)
    for i in graph.input:  # static shapes, batch 1
        assert tuple(d.dim_value for d in i.type.tensor_type.shape.dim) == want[i.name]
    ort_actions = OrtRunner(path, policy.spec, threads=1).run_batched(inputs)
    torch_actions = TorchRunner(policy).run_batched(inputs)
    assert ort_actions.shape == torch_actions.shape == (12, policy.spec.chunk_size, policy.spec.action_dim)
    np.testing.assert_allclose(ort_actions, torch_actions, atol=1e-4, rtol=1e-4)


def test_record_reports_the_polygraphy_comparison(exported):
    rec = exported.records[-1]
    assert rec["stage"] == "export" and rec["exporter"] == "dynamo" and rec["onnx"] == "student.onnx"
    assert rec["compared_against"] == "torch fp32" and "calibration episodes" in rec["comparison_inputs"]
    assert 0 <= rec["max_abs_diff"] < 1e-4 and rec["rel_rms"] < 1e-5
    assert rec["bytes"] == exported.onnx_path.stat().st_size and len(rec["sha256"]) == 64
    assert rec["opset"] == 18 and rec["nodes"] == len(onnx.load(str(exported.onnx_path)).graph.node)
    assert exported.precision == "fp32" and not exported.quantized_torch and exported.kind == "onnx"


def test_same_model_gives_the_same_bytes(exported, policy, tmp_path):
    # A different directory and file name: nothing path-dependent may end up in the graph.
    again = export_policy(policy, tmp_path / "elsewhere" / "other.onnx")
    assert again.read_bytes() == exported.onnx_path.read_bytes()


def test_graph_is_clean_and_names_modules(exported):
    model = onnx.load(str(exported.onnx_path))
    g = model.graph
    assert not model.doc_string and not g.doc_string
    assert all(not n.doc_string and not n.metadata_props for n in g.node)  # no stack traces or file paths
    modules = {node_module(n.name) for n in g.node}
    assert {"expert.state_in", "expert.action_in", "vision.patch_embed", "expert.blocks.0.mlp.fc1"} <= modules
    # Weight transposes are folded: every Linear reads its weight straight from an initializer.
    inits = {i.name for i in g.initializer}
    linear = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and node_module(n.name).endswith(("fc1", "fc2", "qkv", "proj"))]
    assert linear and all(n.input[1] in inits for n in linear)


def test_external_data_above_the_threshold(exported, policy, inputs, tmp_path):
    model = onnx.load(str(exported.onnx_path))
    files = save_onnx(model, tmp_path / "big.onnx", external_data_threshold_mb=0)
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    assert files[0].stat().st_size < exported.onnx_path.stat().st_size / 4  # the weights moved out
    onnx.checker.check_model(str(files[0]))
    a = OrtRunner(files[0], policy.spec, threads=1).run_batched(inputs)
    b = OrtRunner(exported.onnx_path, policy.spec, threads=1).run_batched(inputs)
    np.testing.assert_array_equal(a, b)


def test_torchscript_exporter_for_a_plain_model(policy, tmp_path, inputs):
    ctx = BuildContext(target=load_target("x86-cpu"), workdir=tmp_path, teacher=policy, log=lambda msg: None)
    art = export_stage.run(Artifact(policy=policy), Params(dynamo=False, batch_size=2), ctx)
    rec = art.records[-1]
    assert rec["exporter"] == "torchscript" and rec["max_abs_diff"] < 1e-4
    assert rec["comparison_inputs"].endswith("example inputs")  # no calibration episodes in this context
    shape = onnx.load(str(art.onnx_path)).graph.input[0].type.tensor_type.shape
    assert shape.dim[0].dim_value == 2
    batch = {k: v[:2] for k, v in inputs.items()}
    np.testing.assert_allclose(OrtRunner(art.onnx_path, policy.spec, threads=1).run(batch), TorchRunner(policy).run(batch), atol=1e-4)
    # Other row counts run in slices of the static batch (the last one padded): one row, an odd count,
    # and through run_batched's own chunks (the release before had three slicers, and batch 2 recursed).
    n = len(next(iter(inputs.values())))
    for rows in (1, 3, n):
        part = {k: v[:rows] for k, v in inputs.items()}
        runner = OrtRunner(art.onnx_path, policy.spec, threads=1)
        np.testing.assert_allclose(runner.run(part), TorchRunner(policy).run(part), atol=1e-4)
        np.testing.assert_allclose(runner.run_batched(part, batch_size=5), TorchRunner(policy).run(part), atol=1e-4)


def test_a_mismatch_beyond_tolerance_fails_with_the_numbers(policy, ctx, tmp_path):
    tight = BuildContext(target=ctx.target, workdir=tmp_path, teacher=policy, log=lambda msg: None)
    with pytest.raises(ExportError) as err:
        export_stage.run(Artifact(policy=policy), Params(max_abs_diff=1e-12), tight)
    msg = str(err.value)
    assert "differs from torch by up to" in msg and "tolerance 1e-12" in msg and "student.onnx" in msg
    assert "Hint:" in msg


def test_a_policy_that_does_not_trace_names_the_exporter(policy, tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, images, state, tokens, noise):
            if state.sum() > 0:  # data-dependent control flow: neither exporter can trace it statically
                raise RuntimeError("unsupported")
            return noise.nonzero().float()

    broken = type(policy)(module=Broken(), config=policy.config, spec=policy.spec, family=policy.family)
    with pytest.raises(ExportError) as err:
        export_policy(broken, tmp_path / "x.onnx", dynamo=True)
    assert "dynamo exporter failed" in str(err.value) and "dynamo = true/false" in str(err.value)


@pytest.mark.parametrize("field,value", [("opset", 12), ("opset", 30), ("batch_size", 0), ("max_abs_diff", 0.0), ("external_data_threshold_mb", -1.0)])
def test_check_rejects_bad_params(field, value):
    with pytest.raises(ConfigError) as err:
        export_stage.check(Params(**{field: value}), load_target("x86-cpu"), source="recipes/r.toml")
    assert f"export.{field}" in str(err.value) and "recipes/r.toml" in str(err.value)


def test_kinds():
    assert export_stage.kinds(Params(), load_target("x86-cpu")) == ("torch", "onnx")
