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
    **{f"smolvla:{d.name}": (lambda d=d: load_policy(d / "policy", tokenizer=d / "vlm", lerobot_version="0.4")) for d in sorted(SMOLVLA.iterdir()) if d.is_dir()},
    **{f"smolvla:{d.name}": (lambda d=d: load_policy(d / "policy", tokenizer=d / "vlm"))  # saved by lerobot 0.6.1
       for d in sorted((SMOLVLA.parent / "fixtures061").iterdir()) if d.is_dir()},
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


# --- distillation: "auto" checks BF16 against FP32 before it trains in it --------------------------

LEROBOT_POLICIES = {  # lerobot-saved policies with the episodes lerobot wrote for them
    "smolvla": (SMOLVLA / "one_cam_cross_every2", "vlm"),
    "pi0": (PI0 / "pi0_two_cams", "tokenizer"),
    "pi05": (PI0 / "pi05_two_cams", "tokenizer"),
}


def _policy_dir(tmp_path: Path, which: str) -> Path:
    """The fixture's policy; SmolVLA's with lerobot's default tokenizer length (48) instead of the
    fixture's 12, which its episodes' task fills: prompts padded as most checkpoints pad them."""
    import shutil

    fx, _ = LEROBOT_POLICIES[which]
    if which != "smolvla":
        return fx / "policy"
    out = tmp_path / "policy"
    if out.exists():
        return out
    shutil.copytree(fx / "policy", out)
    for name, a, b in (("policy_preprocessor.json", '"max_length": 12', '"max_length": 48'),
                       ("config.json", '"tokenizer_max_length": 12', '"tokenizer_max_length": 48')):
        text = (out / name).read_text()
        assert a in text, (name, a)
        (out / name).write_text(text.replace(a, b))
    return out


def _shipped_recipe_shortened(tmp_path: Path) -> Path:
    """recipes/x86-cpu.toml as shipped (train_precision "auto", its layers, flow steps and lr), with
    fewer steps and samples for a test."""
    from vlacompile.resources import RECIPES_DIR

    text = (RECIPES_DIR / "x86-cpu.toml").read_text()
    for a, b in {"steps = 2000": "steps = 6", "batch_size = 64": "batch_size = 8", "num_samples = 4096": "num_samples = 16"}.items():
        assert a in text, a
        text = text.replace(a, b)
    assert 'train_precision = "auto"' in text
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _build(tmp_path: Path, which: str, recipe: Path, *extra: str):
    from click.testing import CliRunner

    from vlacompile.cli import main
    from vlacompile.resources import TARGETS_DIR

    fx, tok = LEROBOT_POLICIES[which]
    if which == "smolvla":
        extra = ("--lerobot-version", "0.4", *extra)  # saved by lerobot 0.4.4, whose config.json does not say so
    # the fixtures' chunks are shorter than x86-cpu's 8 executed actions
    target = tmp_path / "x86-cpu.toml"
    target.write_text((TARGETS_DIR / "x86-cpu.toml").read_text().replace("actions_per_chunk = 8", "actions_per_chunk = 4"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "--quiet", "--calls", "20", "--no-closed-loop", "--no-cache", "--target", str(target),
                                       "--checkpoint", str(_policy_dir(tmp_path, which)), "--tokenizer", str(fx / tok), "--episodes", str(fx / "episodes"),
                                       "--recipe", str(recipe), "--out", str(out), *extra])
    assert "Traceback" not in result.output, result.output
    return result, out


def _distill_record(out: Path) -> dict:
    import json

    return next(r for r in json.loads((out / "report.json").read_text())["stages"] if r["stage"] == "distill")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with BF16 units, wherever the test runs (this one's flags are not the point)."""
    from vlacompile import training

    monkeypatch.setattr(training, "native_bf16", lambda device=None: True)


@pytest.mark.parametrize("which", sorted(LEROBOT_POLICIES))
def test_lerobot_policies_distil_in_bf16_with_the_shipped_recipe(bf16_cpu, tmp_path, which):
    result, out = _build(tmp_path, which, _shipped_recipe_shortened(tmp_path))
    assert result.exit_code in (0, 1), result.output
    record = _distill_record(out)
    assert record["precision"] == "bf16", record
    assert "native BF16 units" in record["precision_reason"] and "from FP32 on the first batch" in record["precision_reason"]


@pytest.mark.parametrize("which", ["pi0", "smolvla"])  # pi0.5's fixture gives a 1-layer student, which reads no padded query
def test_auto_falls_back_to_fp32_where_bf16_is_not_finite(bf16_cpu, monkeypatch, tmp_path, which):
    """With the mask value the project had (float32's lowest: -inf in BF16), "auto" sees the NaN on
    the first batch, trains in FP32 and says why; an explicit "bf16" fails naming the precision."""
    from vlacompile.families import blocks

    monkeypatch.setattr(blocks, "MASKED_SCORE", float(torch.finfo(torch.float32).min))
    recipe = _shipped_recipe_shortened(tmp_path)
    result, out = _build(tmp_path, which, recipe)
    assert result.exit_code in (0, 1), result.output
    record = _distill_record(out)
    assert record["precision"] == "fp32" and "non-finite" in record["precision_reason"], record
    assert "falling back to FP32" in result.output or "falling back to FP32" in record["precision_reason"]

    recipe.write_text(recipe.read_text().replace('train_precision = "auto"', 'train_precision = "bf16"'))
    result, _ = _build(tmp_path, which, recipe)
    assert result.exit_code == 2, result.output
    assert "BF16 autocast" in result.output and 'train_precision = "fp32"' in result.output, result.output
