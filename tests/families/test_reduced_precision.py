"""Every family computes finite, faithful actions in each precision the project trains or exports in.

Distillation runs the student's forward under BF16 autocast, and TensorRT engines for the Jetson
and GPU targets run in FP16/BF16. A large constant that is finite in float32 (the masked-score fill
lerobot uses, float32's lowest) becomes -inf there, and a fully masked attention row (a padded
prompt position as query) turns into NaN that spreads through every later product. So each
family's teacher and a student of the default recipe's shape run, on inputs with padded and fully
padded prompts, under BF16 and FP16 autocast, and their exported graphs with every float constant
rounded to FP16 (what an FP16 engine stores): all finite and close to FP32.

Every fixture configuration a family ships runs (attention patterns: SmolVLA's self/cross
interleaving and prefix padding, pi0's and pi0.5's prefix/suffix blocks, K/V head counts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_conformance import PI0, POLICIES, SMOLVLA, feeds_for

from vlacompile.checkpoint import load_policy
from vlacompile.families import get_family

# Every shipped configuration of each family, beside the conformance suite's one per family.
CONFIGS = {
    "vlacompile-reference": POLICIES["vlacompile-reference"],
    **{f"smolvla:{d.name}": (lambda d=d: load_policy(d / "policy", tokenizer=d / "vlm")) for d in sorted(SMOLVLA.iterdir()) if d.is_dir()},
    **{f"pi0:{d.name}": (lambda d=d: load_policy(d / "policy", tokenizer=d / "tokenizer")) for d in sorted(PI0.iterdir()) if d.is_dir()},
}
# Relative L2 error of the chunk against FP32. BF16 keeps 8 significant bits (0.4% a rounding), FP16
# 11; the tiny random policies measured up to 0.6% (BF16) and 0.08% (FP16): these bounds catch
# garbage and NaN with room for other inputs, not a few roundings more.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}
# Every weight rounded to FP16 as well (autocast keeps FP32 weights): up to 1.3% measured.
GRAPH_TOLERANCE = 0.05

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def teacher(request):
    return CONFIGS[request.param]()


def student_of(teacher):
    """A student of the shipped recipes' shape: half of every part's layers (SmolVLA and pi0 pair
    their expert with the backbone), 2 flow steps."""
    family = get_family(teacher.family)
    depths = family.depths(teacher.config)
    request = {p: 0.5 for p in depths if not (p == "expert" and teacher.family != "vlacompile-reference")}
    layers = family.resolve_layers(teacher.config, request, source="test")
    widths = family.mlp_widths(teacher.config)
    mlp = {p: [widths[p][j] for j in layers[p]] for p in layers if p in widths}
    cfg = family.student_config(teacher.config, layers, mlp, 2)
    return family.restructure(teacher, cfg, layers=layers, keep={})


def padded_feeds(policy) -> dict[str, np.ndarray]:
    """Three observations: the first with a fully padded prompt, the second with one real token, the
    third as the preprocessor made it (padded to the tokenizer's length)."""
    feeds = feeds_for(policy, batch=3)
    spec = policy.spec
    tokens = next(i.name for i in spec.inputs if i.role == "tokens")
    mask = next((i.name for i in spec.inputs if i.role == "token_mask"), None)
    feeds[tokens][0] = 0  # the reference family's pad id; the others read the mask
    feeds[tokens][1, 1:] = 0
    if mask is not None:
        feeds[mask][0] = False
        feeds[mask][1, 1:] = False
        assert not feeds[mask][2].all(), "the preprocessor pads the prompt"
    return feeds


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_autocast_forward_is_finite_and_close(teacher, which, dtype):
    policy = teacher if which == "teacher" else student_of(teacher)
    feeds = padded_feeds(policy)
    want = policy.run_feeds(feeds).numpy()
    assert np.isfinite(want).all()
    with torch.autocast("cpu", dtype=dtype):
        got = policy.run_feeds(feeds).float().numpy()
    assert np.isfinite(got).all(), f"{which} under {dtype} autocast: non-finite actions in rows {sorted(set(np.argwhere(~np.isfinite(got))[:, 0]))}"
    assert relative_error(got, want) < TOLERANCE[dtype]


def _fp16_constants(path: Path) -> None:
    """Round every float32 initializer and Constant to FP16 and back, in place: the values an FP16
    engine builds from (a constant beyond FP16's range becomes inf)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))

    def rounded(t):
        a = numpy_helper.to_array(t)
        with np.errstate(over="ignore"):
            return numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name)

    for i, t in enumerate(model.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT:
            model.graph.initializer[i].CopyFrom(rounded(t))
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT:
            n.attribute[0].t.CopyFrom(rounded(n.attribute[0].t))
    onnx.save(model, str(path))


def test_exported_graphs_with_fp16_constants_are_finite_and_close(teacher, tmp_path):
    """The single graph and the split System 2 + System 1 graphs of a student, their constants as an
    FP16 engine holds them, on padded prompts."""
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.split import SplitRunner
    from vlacompile.stages.export import export_policy, export_split

    student = student_of(teacher)
    export_policy(student, tmp_path / "student.onnx")
    export_split(student, tmp_path)
    for f in tmp_path.glob("*.onnx"):
        _fp16_constants(f)
    feeds = padded_feeds(student)
    want = student.run_feeds(feeds).numpy()
    single = np.concatenate([OrtRunner(tmp_path / "student.onnx", student.spec, threads=1).run({k: v[i : i + 1] for k, v in feeds.items()})
                             for i in range(3)])
    split = np.concatenate([SplitRunner(tmp_path, student.spec, threads=1).run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(3)])
    for name, got in (("student.onnx", single), ("system2 + system1", split)):
        assert np.isfinite(got).all(), f"{name} with FP16 constants: non-finite actions"
        assert relative_error(got, want) < GRAPH_TOLERANCE, name
