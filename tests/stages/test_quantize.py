"""quantize: each method really quantises, keeps excluded layers FP32, stays close to FP32, and
illegal precision/method/target combinations fail before any work."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_policy

from vlacompile.backends.onnxrt import OrtRunner
from vlacompile.backends.torch_eager import TorchRunner
from vlacompile.errors import ConfigError
from vlacompile.quantizers import node_module, sample_inputs
from vlacompile.recipes import check_recipe, parse_recipe
from vlacompile.stages import Artifact, BuildContext
from vlacompile.stages import export as export_stage
from vlacompile.stages import quantize as quantize_stage
from vlacompile.stages.export import ExportError
from vlacompile.families.reference.family import DEFAULT_QUANT_EXCLUDE as DEFAULT_EXCLUDE
from vlacompile.stages.quantize import Params
from vlacompile.targets import load_target

pytestmark = pytest.mark.usefixtures("single_thread")

# NMSE vs the FP32 graph (per action dimension, normalised by the FP32 actions' variance over
# held-out observations and noises), measured on the tiny teacher with the default excludes:
# ORT dynamic INT8 5.2e-5, ORT static INT8 6.1e-5 (7-bit weights, the same natively with VNNI and under
# `qemu-x86_64 -cpu Haswell` without it; full-range weights gave 3.4e-3 and 2.2e-3 there, from int16
# saturation: see vlacompile/quantizers/ort.py), modelopt INT8 ~1.5e-5, MatMulNBits INT4 ~2e-3.
# The bounds leave 10-50x headroom; an unquantised or broken graph lands at 0 or at ~1.
INT8_NMSE = 1e-3
INT4_NMSE = 2e-2


def nmse(reference: np.ndarray, other: np.ndarray) -> float:
    ref = reference.reshape(-1, reference.shape[-1])
    err = (other.reshape(ref.shape) - ref) ** 2
    return float((err.mean(0) / ref.var(0)).mean())


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def policy(tiny_config, tiny_episode_set):
    return make_tiny_policy(tiny_config, tiny_episode_set)


@pytest.fixture(scope="module")
def cpu_ctx(tmp_path_factory, policy, tiny_episode_set):
    return BuildContext(
        target=load_target("x86-cpu"), workdir=tmp_path_factory.mktemp("cpu"), teacher=policy,
        calibration=tiny_episode_set, log=lambda msg: None,
    )


@pytest.fixture(scope="module")
def fp32(policy, cpu_ctx) -> Artifact:
    return export_stage.run(Artifact(policy=policy), export_stage.Params(), cpu_ctx)


@pytest.fixture(scope="module")
def held_out(policy, tiny_episode_set):
    return sample_inputs(policy.spec, tiny_episode_set, 32, seed=99)


@pytest.fixture(scope="module")
def fp32_actions(fp32, policy, held_out):
    return OrtRunner(fp32.onnx_path, policy.spec, threads=1).run_batched(held_out)


def quantize_onnx(fp32: Artifact, params: Params, ctx: BuildContext, workdir: Path) -> Artifact:
    local = BuildContext(target=ctx.target, workdir=workdir, teacher=ctx.teacher, calibration=ctx.calibration, log=lambda m: None)
    quantize_stage.check(params, local.target, source="test")
    return quantize_stage.run(fp32, params, local)


@pytest.fixture(scope="module")
def int8_dynamic(fp32, cpu_ctx, tmp_path_factory) -> Artifact:
    return quantize_onnx(fp32, Params(precision="int8"), cpu_ctx, tmp_path_factory.mktemp("int8"))


def test_int8_dynamic_really_quantises_and_stays_close(int8_dynamic, fp32, policy, held_out, fp32_actions):
    path = int8_dynamic.onnx_path
    assert path.name == "student.int8.onnx" and int8_dynamic.precision == "int8"
    found = ops(path)
    assert found["MatMulInteger"] > 0 and found["DynamicQuantizeLinear"] > 0
    assert path.stat().st_size < 0.6 * fp32.onnx_path.stat().st_size
    actions = OrtRunner(path, policy.spec, threads=1).run_batched(held_out)
    assert np.isfinite(actions).all()
    assert np.abs(actions - fp32_actions).max() > 1e-5  # not the FP32 graph under another name
    assert nmse(fp32_actions, actions) < INT8_NMSE
    rec = int8_dynamic.records[-1]
    assert rec["stage"] == "quantize" and rec["method"] == "ort-dynamic" and rec["precision"] == "int8"
    assert rec["bytes_after"] < rec["bytes_before"] and rec["onnx"] == "student.int8.onnx"


def test_excluded_layers_and_attention_stay_fp32(int8_dynamic):
    graph = onnx.load(str(int8_dynamic.onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    by_module: dict[str, set[str]] = {}
    for n in graph.node:
        by_module.setdefault(node_module(n.name), set()).add(n.op_type)
    for module in ("expert.state_in", "expert.action_in", "expert.action_out"):
        assert "MatMulInteger" not in by_module[module] and by_module[module] & {"MatMul", "Gemm"}, module
        weights = [inits[i] for n in graph.node if node_module(n.name) == module for i in n.input if i in inits]
        assert weights and all(w.data_type == onnx.TensorProto.FLOAT for w in weights)
    assert "MatMulInteger" in by_module["expert.blocks.0.mlp.fc1"]
    assert "MatMulInteger" not in by_module["expert.blocks.0.attn"]  # q @ k^T and p @ v
    assert sorted(int8_dynamic.records[-1]["excluded"]) == ["expert.action_in", "expert.action_out", "expert.state_in"]


def test_quantised_bytes_are_deterministic(int8_dynamic, fp32, cpu_ctx, tmp_path):
    again = quantize_onnx(fp32, Params(precision="int8"), cpu_ctx, tmp_path)
    assert again.onnx_path.read_bytes() == int8_dynamic.onnx_path.read_bytes()


def test_int4_matmulnbits(fp32, cpu_ctx, policy, held_out, fp32_actions, tmp_path):
    art = quantize_onnx(fp32, Params(precision="int4", block_size=32), cpu_ctx, tmp_path)
    assert art.onnx_path.name == "student.int4.onnx" and art.records[-1]["method"] == "ort-int4"
    assert ops(art.onnx_path)["MatMulNBits"] > 0
    assert art.records[-1]["bytes_after"] < 0.5 * art.records[-1]["bytes_before"]
    actions = OrtRunner(art.onnx_path, policy.spec, threads=1).run_batched(held_out)
    assert 0 < nmse(fp32_actions, actions) < INT4_NMSE


def test_int8_static_qdq_and_attention_setting(fp32, cpu_ctx, policy, held_out, fp32_actions, tmp_path):
    def attention_inputs_quantised(path: Path) -> bool:
        graph = onnx.load(str(path)).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        attn = [n for n in graph.node if n.op_type == "MatMul" and node_module(n.name).endswith(".attn")]
        return bool(attn) and all(producer.get(i) == "DequantizeLinear" for n in attn for i in n.input)

    plain = quantize_onnx(fp32, Params(method="ort-static", calibration_samples=16), cpu_ctx, tmp_path / "a")
    assert ops(plain.onnx_path)["QuantizeLinear"] > 0 and not attention_inputs_quantised(plain.onnx_path)
    assert nmse(fp32_actions, OrtRunner(plain.onnx_path, policy.spec, threads=1).run_batched(held_out)) < INT8_NMSE
    attn = quantize_onnx(fp32, Params(method="ort-static", calibration_samples=16, quantize_attention=True), cpu_ctx, tmp_path / "b")
    assert attention_inputs_quantised(attn.onnx_path)


def test_modelopt_int8_exports_qdq_on_matmuls_only(policy, cpu_ctx, held_out, fp32_actions, tmp_path):
    ctx = BuildContext(target=load_target("jetson-orin"), workdir=tmp_path, teacher=policy, calibration=cpu_ctx.calibration, log=lambda m: None)
    params = Params(precision="int8", calibration_samples=32)
    assert quantize_stage.kinds(params, ctx.target) == ("torch", "torch")  # auto -> modelopt on TensorRT
    quantize_stage.check(params, ctx.target, source="test")
    art = quantize_stage.run(Artifact(policy=policy), params, ctx)
    assert art.quantized_torch and art.precision == "int8" and art.records[-1]["method"] == "modelopt"
    assert art.policy.module is not policy.module
    assert not any(type(m).__name__ == "TensorQuantizer" for m in policy.module.modules())  # teacher untouched
    with pytest.raises(ExportError, match="dynamo"):
        export_stage.export_policy(art.policy, tmp_path / "x.onnx", dynamo=True)
    art = export_stage.run(art, export_stage.Params(), ctx)
    rec = art.records[-1]
    assert rec["exporter"] == "torchscript" and rec["compared_against"] == "torch fake-quant" and rec["rel_rms"] < 0.02

    graph = onnx.load(str(art.onnx_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def dq_input(value: str):
        node = producer.get(value)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    linears = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and not node_module(n.name).endswith((".attn", ".cross"))]
    quantised = [n for n in linears if not any(node_module(n.name).startswith(p) for p in DEFAULT_EXCLUDE)]
    assert quantised
    for n in quantised:
        act, weight = dq_input(n.input[0]), dq_input(n.input[1])
        assert act is not None and producer[act.input[0]].op_type == "QuantizeLinear", n.name  # activation Q/DQ
        assert weight is not None and inits[weight.input[0]].data_type == onnx.TensorProto.INT8, n.name  # int8 weight
    for n in linears:
        if node_module(n.name).startswith(DEFAULT_EXCLUDE):
            assert dq_input(n.input[0]) is None and dq_input(n.input[1]) is None, n.name
    for n in graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert dq_input(n.input[0]) is None, n.name

    actions = OrtRunner(art.onnx_path, policy.spec, threads=1).run_batched(held_out)
    assert 0 < nmse(fp32_actions, actions) < INT8_NMSE
    torch_fp32 = TorchRunner(policy).run_batched(held_out)
    assert nmse(torch_fp32, actions) < INT8_NMSE


def test_fp8_on_orin_fails_in_check_naming_precision_and_target():
    target = load_target("jetson-orin")
    with pytest.raises(ConfigError) as err:
        quantize_stage.check(Params(precision="fp8"), target, source="recipes/orin-fp8.toml")
    msg = str(err.value)
    assert "'fp8'" in msg and "jetson-orin" in msg and target.path in msg and "recipes/orin-fp8.toml" in msg
    assert "no FP8 hardware" in msg and "use int8" in msg and "fp32, fp16, int8, int4" in msg


def test_recipe_check_catches_fp8_on_orin_before_any_work():
    recipe = parse_recipe(
        {"name": "bad", "stages": [{"stage": "quantize", "precision": "fp8"}, {"stage": "export"}]}, "recipes/bad.toml"
    )
    with pytest.raises(ConfigError, match="fp8.*jetson-orin"):
        check_recipe(recipe, load_target("jetson-orin"))


@pytest.mark.parametrize(
    "target,params,words",
    [
        ("jetson-thor", Params(method="ort-dynamic"), ["ort-dynamic", "TensorRT cannot run", "modelopt"]),
        ("jetson-thor", Params(precision="int4", method="ort-int4"), ["MatMulNBits", "TensorRT"]),
        ("x86-cpu", Params(precision="int4", method="modelopt"), ["TensorRT-only", "ort-int4"]),
        ("x86-cpu", Params(precision="fp16"), ["'fp16'", "x86-cpu", "fp32, int8, int4"]),
        ("jetson-thor", Params(precision="fp16", method="modelopt"), ["does not make FP16"]),
        ("x86-cpu", Params(method="ort-int4"), ["'ort-int4' cannot make int8", "ort-dynamic"]),
        ("x86-cpu", Params(quantize_attention=True), ["quantize_attention", "ort-static"]),
        ("jetson-thor", Params(quantize_attention=True), ["quantize_attention", "torch.matmul"]),
        ("x86-cpu", Params(precision="int4", block_size=48), ["block_size", "powers of two"]),
        ("x86-cpu", Params(calibration_samples=0), ["calibration_samples"]),
    ],
)
def test_illegal_combinations_fail_in_check(target, params, words):
    with pytest.raises(ConfigError) as err:
        quantize_stage.check(params, load_target(target), source="recipes/r.toml")
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize(
    "target,precision,method,kinds",
    [
        ("x86-cpu", "int8", "ort-dynamic", ("onnx", "onnx")),
        ("x86-cpu", "int4", "ort-int4", ("onnx", "onnx")),
        ("jetson-thor", "int8", "modelopt", ("torch", "torch")),
        ("jetson-thor", "fp8", "modelopt", ("torch", "torch")),
        ("jetson-orin", "int4", "modelopt", ("torch", "torch")),
        ("jetson-thor", "fp16", "auto", ("onnx", "onnx")),
    ],
)
def test_auto_resolves_per_runtime(target, precision, method, kinds):
    t = load_target(target)
    params = Params(precision=precision)
    quantize_stage.check(params, t, source="test")
    assert quantize_stage.resolve_method(params, t) == method
    assert quantize_stage.kinds(params, t) == kinds


def test_an_exclude_that_matches_nothing_is_an_error(fp32, cpu_ctx, tmp_path):
    with pytest.raises(ConfigError) as err:
        quantize_onnx(fp32, Params(exclude=("expert.stat_in",)), cpu_ctx, tmp_path)
    assert "expert.stat_in" in str(err.value) and "match no node" in str(err.value)


def test_quantising_twice_is_refused(int8_dynamic, cpu_ctx, tmp_path):
    with pytest.raises(ConfigError, match="already int8"):
        quantize_onnx(int8_dynamic, Params(precision="int4"), cpu_ctx, tmp_path)


def test_fp16_on_tensorrt_is_recorded_for_the_builder(fp32, policy, tmp_path):
    ctx = BuildContext(target=load_target("jetson-thor"), workdir=tmp_path, teacher=policy, log=lambda m: None)
    params = Params(precision="fp16")
    quantize_stage.check(params, ctx.target, source="test")
    art = quantize_stage.run(fp32, params, ctx)
    assert art.precision == "fp16" and art.onnx_path == fp32.onnx_path  # same graph: FP16 is a builder flag
    rec = art.records[-1]
    assert rec["method"] == "tensorrt-builder-flag" and rec["bytes_after"] == rec["bytes_before"] and "builder" in rec["note"]
