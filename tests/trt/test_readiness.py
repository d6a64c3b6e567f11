"""Static TensorRT-readiness check: the modelopt INT8 export passes; unsupported ops, dynamic
shapes, misplaced Q/DQ, asymmetric zero points and too-new opsets fail, naming the nodes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_policy
from onnx import TensorProto, helper, numpy_helper

from vlacompile.errors import ConfigError
from vlacompile.stages import Artifact, BuildContext
from vlacompile.stages import export as export_stage
from vlacompile.stages import quantize as quantize_stage
from vlacompile.targets import load_target
from vlacompile.trt import ReadinessError
from vlacompile.trt.readiness import check_readiness, readiness_report

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def thor():
    return load_target("jetson-thor")


@pytest.fixture(scope="module")
def int8_dir(tiny_config, tiny_episode_set, tmp_path_factory, thor) -> Path:
    """The modelopt INT8 export of the tiny teacher for Thor: single graph and split graphs."""
    policy = make_tiny_policy(tiny_config, tiny_episode_set)
    out = tmp_path_factory.mktemp("int8")
    ctx = BuildContext(target=thor, workdir=out, teacher=policy, calibration=tiny_episode_set, log=lambda m: None)
    art = quantize_stage.run(Artifact(policy=policy), quantize_stage.Params(precision="int8", calibration_samples=16), ctx)
    export_stage.run(art, export_stage.Params(split=True), ctx)
    return out


def edited(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("name", ["student.onnx", "system2.onnx", "system1.onnx"])
def test_modelopt_int8_export_is_ready(int8_dir, thor, name):
    report = check_readiness(int8_dir / name, thor)
    assert report["ready"] and report["problems"] == [] and report["tensorrt"] == "10.13"
    assert report["opset"] == 18 and report["opset_range"] == [9, 20]
    assert report["qdq"]["quantized_layers"] > 10 and report["qdq"]["qdq_pairs"] == report["qdq"]["quantized_layers"]


@pytest.mark.parametrize("domain,op", [("", "StringNormalizer"), ("com.example", "FancyAttention"), ("com.microsoft", "MatMulInteger")])
def test_unsupported_op_fails_naming_the_node(int8_dir, thor, tmp_path, domain, op):
    def inject(model):
        first = model.graph.node[0]
        # A node whose output nothing reads: only its op matters to the parser check.
        model.graph.node.append(helper.make_node(op, [first.output[0]], ["injected_out"], name="/injected/bad_op", domain=domain))
        if domain:
            model.opset_import.append(helper.make_opsetid(domain, 1))

    path = edited(int8_dir / "system1.onnx", tmp_path / "bad.onnx", inject)
    with pytest.raises(ReadinessError, match="does not import") as e:
        check_readiness(path, thor)
    assert "/injected/bad_op" in str(e.value) and op in str(e.value)
    assert readiness_report(path, thor)["problems"][0]["nodes"] == [f"/injected/bad_op ({domain + '::' if domain else ''}{op})"]


def test_dynamic_batch_fails_naming_the_input(int8_dir, thor, tmp_path):
    def dynamic(model):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        model.graph.output[0].type.tensor_type.shape.dim[0].ClearField("dim_value")

    path = edited(int8_dir / "system2.onnx", tmp_path / "dyn.onnx", dynamic)
    with pytest.raises(ReadinessError, match="dynamic dimensions") as e:
        check_readiness(path, thor)
    assert "input 'images' dim 0 is symbolic 'batch'" in str(e.value)
    assert "output 'prefix' dim 0 is unknown" in str(e.value)


def qdq_graph(tmp_path: Path, *, consumer: str = "Softmax", zero_point: int = 0, quantize_activation: bool = True) -> Path:
    """x [1, 4, 8] -> Q/DQ -> MatMul(int8 weight DQ) -> Q/DQ -> consumer -> y."""
    w = numpy_helper.from_array(np.ones((8, 8), np.int8), "w_q")
    inits = [
        w,
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "zp"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wzp"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "ws", "wzp"], ["w"], name="/fc/w_dq", axis=1)]
    if quantize_activation:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="/fc/in_q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="/fc/in_dq"),
        ]
    nodes += [
        helper.make_node("MatMul", ["xd" if quantize_activation else "x", "w"], ["h"], name="/fc/MatMul"),
        helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["hq"], name="/attn/softmax_q"),
        helper.make_node("DequantizeLinear", ["hq", "s", "zp"], ["hd"], name="/attn/softmax_dq"),
        helper.make_node(consumer, ["hd"] * (2 if consumer == "Add" else 1), ["y"], name=f"/attn/{consumer}"),
    ]
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8])
    graph = helper.make_graph(nodes, "qdq", [f("x")], [f("y")], inits)
    path = tmp_path / f"qdq-{consumer}-{zero_point}-{quantize_activation}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    onnx.checker.check_model(str(path))
    return path


def test_qdq_pair_feeding_softmax_is_flagged(tmp_path, thor):
    report = readiness_report(qdq_graph(tmp_path, consumer="Softmax"), thor)
    assert not report["ready"]
    (problem,) = report["problems"]
    assert problem["kind"] == "not_feeding_matmul" and problem["nodes"] == ["/attn/softmax_dq -> /attn/Softmax (Softmax)"]
    assert report["qdq"]["quantized_layers"] == 1  # the MatMul itself is fine
    with pytest.raises(ReadinessError, match="feed no MatMul") as e:
        check_readiness(qdq_graph(tmp_path, consumer="Add"), thor)
    assert "/attn/softmax_dq -> /attn/Add (Add)" in str(e.value)


def test_qdq_through_a_transpose_into_a_matmul_is_fine(tmp_path, thor):
    path = qdq_graph(tmp_path, consumer="Relu")

    def reroute(model):
        g = model.graph
        g.node.remove(next(n for n in g.node if n.name == "/attn/Relu"))
        g.node.extend([
            helper.make_node("Transpose", ["hd"], ["hdt"], name="/attn/T", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["hd", "hdt"], ["y"], name="/attn/scores"),
        ])
        g.output[0].type.tensor_type.shape.dim[2].dim_value = 4

    report = readiness_report(edited(path, tmp_path / "t.onnx", reroute), thor)
    # /attn/scores: both inputs come from the same DQ (one through a Transpose): a quantised matmul.
    assert report["ready"], report["problems"]
    assert report["qdq"]["quantized_layers"] == 2


def test_half_quantized_matmul_and_asymmetric_zero_point_are_flagged(tmp_path, thor):
    report = readiness_report(qdq_graph(tmp_path, consumer="Relu", quantize_activation=False), thor)
    kinds = {p.get("kind"): p["nodes"] for p in report["problems"]}
    assert kinds["half_quantized"] == ["/fc/MatMul (float input 'x')"]
    report = readiness_report(qdq_graph(tmp_path, consumer="Relu", zero_point=3), thor)
    kinds = {p.get("kind"): p["nodes"] for p in report["problems"]}
    assert set(kinds["nonzero_zero_point"]) == {"/fc/in_dq", "/attn/softmax_dq"}


def test_opset_range_follows_the_tensorrt_version(int8_dir, tmp_path, thor):
    def opset21(model):
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 21

    path = edited(int8_dir / "system1.onnx", tmp_path / "o21.onnx", opset21)
    with pytest.raises(ReadinessError, match="opset 21 outside 9..20"):
        check_readiness(path, thor)  # TensorRT 10.13: documented floor 9..20
    assert readiness_report(path, "10.15")["ready"]  # 10.15 documents 9..24


def test_trt_domain_ops_depend_on_the_version(tmp_path):
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])
    nodes = [helper.make_node("TRT_FP4DynamicQuantize", ["x"], ["y"], name="/fc/fp4_q", domain="trt")]
    graph = helper.make_graph(nodes, "fp4", [f("x")], [f("y")])
    path = tmp_path / "fp4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("trt", 1)]), str(path))
    orin = readiness_report(path, load_target("jetson-orin"))  # TensorRT 10.3: no FP4 ops
    assert orin["problems"][0]["nodes"] == ["/fc/fp4_q (trt::TRT_FP4DynamicQuantize)"]
    thor = readiness_report(path, "10.13")
    assert all(p["check"] != "ops" for p in thor["problems"])


def test_a_target_without_tensorrt_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="names no TensorRT version"):
        readiness_report(qdq_graph(tmp_path), load_target("x86-cpu"))


def test_constants_beyond_fp16_and_bf16_fail_naming_them(tmp_path, thor, monkeypatch):
    """A SmolVLA graph exported with the masked-attention fill lerobot uses (float32's lowest, -inf
    in FP16 and BF16) is not ready for Thor, whose engines may run in either; the project's fill
    (float16's lowest) is. A flag-built engine checks only its own precision."""
    import torch

    from vlacompile.checkpoint import load_policy
    from vlacompile.families import blocks
    from vlacompile.stages.export import export_policy

    fx = Path(__file__).parents[1] / "families" / "smolvla" / "fixtures" / "one_cam_cross_every2"
    policy = load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.4")
    export_policy(policy, tmp_path / "ok.onnx")
    monkeypatch.setattr(blocks, "MASKED_SCORE", float(torch.finfo(torch.float32).min))
    export_policy(policy, tmp_path / "bad.onnx")

    report = readiness_report(tmp_path / "ok.onnx", thor)
    assert report["ready"], report["problems"]
    assert report["reduced_precisions"] == ["fp16", "bf16"]
    report = readiness_report(tmp_path / "bad.onnx", thor)
    (problem,) = [p for p in report["problems"] if p["check"] == "constants"]
    assert not report["ready"] and problem["nodes"] and all("-3.403e+38" in n and "FP16" in n for n in problem["nodes"])
    with pytest.raises(ReadinessError, match="float constants beyond the range of FP16/BF16"):
        check_readiness(tmp_path / "bad.onnx", thor)
    # x86-cpu-like devices and INT8 (strongly typed) engines keep float layers in FP32
    assert check_readiness(tmp_path / "bad.onnx", "10.13", precisions=())["ready"]
    assert not readiness_report(tmp_path / "bad.onnx", "10.13", precisions=("bf16",))["ready"]
