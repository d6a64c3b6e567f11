"""pi0 and pi0.5 policies written by lerobot 0.6.1 build end to end on episodes written by lerobot:
pi0 for x86-cpu (measured), pi0.5 for Jetson Thor (split graphs with INT8 Q/DQ, readiness checked,
estimated: exit 3); bad inputs (a lerobot 0.4.x pipeline, relative actions, a type that does not
match the weights, a missing tokenizer) are clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vlacompile.checkpoint import load_policy
from vlacompile.cli import main
from vlacompile.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_UNVERIFIED, CheckpointError
from vlacompile.resources import TARGETS_DIR

FX = Path(__file__).parent / "fixtures"
PI0, PI05 = FX / "pi0_two_cams", FX / "pi05_two_cams"

RECIPE = """
name = "tiny-pi0"
[[stages]]
stage = "distill"
layers = { vision = 0.5, backbone = 0.67 }
mlp_ratio = 0.5
flow_steps = 2
steps = 30
batch_size = 8
num_samples = 64
[[stages]]
stage = "export"
"""
THOR_RECIPE = """
name = "tiny-pi05-thor"
[[stages]]
stage = "distill"
layers = { backbone = 0.5 }
flow_steps = 2
steps = 10
batch_size = 8
num_samples = 32
[[stages]]
stage = "quantize"
precision = "int8"
calibration_samples = 8
[[stages]]
stage = "export"
split = true
"""

pytestmark = pytest.mark.usefixtures("single_thread")


def _build(args: list[str]):
    result = CliRunner().invoke(main, ["build", "--quiet", "--calls", "20", *args])
    assert "Traceback" not in result.output, result.output
    return result


def _target(tmp: Path, name: str, **replace) -> Path:
    text = (TARGETS_DIR / f"{name}.toml").read_text()
    for a, b in replace.items():
        assert a in text, a
        text = text.replace(a, b)
    path = tmp / f"{name}-test.toml"
    path.write_text(text)
    return path


def test_pi0_builds_for_x86_cpu(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    # the fixture's chunk is 5 actions; the gates stay as shipped
    target = _target(tmp_path, "x86-cpu", **{"actions_per_chunk = 8": "actions_per_chunk = 4"})
    result = _build(["--target", str(target), "--checkpoint", str(PI0 / "policy"), "--tokenizer", str(PI0 / "tokenizer"),
                     "--episodes", str(PI0 / "episodes"), "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")])
    assert result.exit_code in (EXIT_OK, EXIT_GATE_FAILED), result.output
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["family"] == "pi0" and report["teacher"]["label"] == "LeRobot pi0"
    assert "lerobot pi0 policy directory" in report["teacher"]["format"]
    assert report["student"]["flow_steps"] == 2 and report["latency"]["student"]["kind"] == "measured"
    assert report["student"]["config"]["variant"] == "pi0"
    # A self-contained lerobot-layout student (tokenizer copied in), the network student.onnx computes.
    student = load_policy(out / "student")
    assert student.config.depth == 2 and student.config.vision_layers == 1 and student.config.num_steps == 2
    assert (out / "student" / "tokenizer" / "tokenizer.json").is_file()
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.data import read_episodes
    from vlacompile.quantizers import sample_inputs

    x = sample_inputs(student.spec, read_episodes(PI0 / "episodes"), 4, seed=1)
    np.testing.assert_allclose(OrtRunner(out / "student.onnx", student.spec, threads=1).run_batched(x),
                               student.run_feeds(x).numpy(), rtol=1e-4, atol=1e-5)
    # The torch-free runtime loads it (the tokenizer the student carries is among the hashed files) and runs what verify ran.
    _runs_in_the_runtime(out, PI0, "single")
    assert "student/tokenizer/tokenizer.json" in json.loads((out / "manifest.json").read_text())["runtime_files"]


def test_pi05_builds_for_jetson_thor_with_split_int8_graphs(tmp_path):
    (tmp_path / "r.toml").write_text(THOR_RECIPE)
    thor = _target(tmp_path, "jetson-thor", **{"actions_per_chunk = 16": "actions_per_chunk = 4"})
    result = _build(["--target", str(thor), "--checkpoint", str(PI05 / "policy"), "--tokenizer", str(PI05 / "tokenizer"),
                     "--episodes", str(PI05 / "episodes"), "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "thor"),
                     "--no-cache"])
    assert result.exit_code == EXIT_UNVERIFIED, result.output
    out = tmp_path / "thor"
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["label"] == "LeRobot pi0.5"
    assert {"student.onnx", "system2.onnx", "system1.onnx", "split.json"} <= {p.name for p in out.iterdir()}
    assert all(r["ready"] for r in report["tensorrt_readiness"].values()), report["tensorrt_readiness"]
    split = json.loads((out / "split.json").read_text())
    assert split["integrator"]["times"] == [1.0, 0.5]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "system1.onnx"), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops
    names = [i.name for i in onnx.load(str(out / "system2.onnx"), load_external_data=False).graph.input]
    assert "state" not in names  # pi0.5's state reaches the model only as prompt tokens
    assert report["roofline"]["student"]["system1"]["steps"] == 2
    _runs_in_the_runtime(out, PI05, "split")


def _runs_in_the_runtime(out: Path, fixture: Path, graph: str) -> None:
    """The artifact loads in vlacompile_runtime and gives the compiler's ONNX Runtime chunk on lerobot's cases."""
    from safetensors.numpy import load_file
    import vlacompile_runtime

    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.split import SplitRunner
    from vlacompile.observation import from_lerobot

    policy = vlacompile_runtime.load(out, threads=1, graph=graph)
    runner = OrtRunner(out / "student.onnx", policy.spec, threads=1) if graph == "single" else SplitRunner(out, policy.spec, threads=1)
    arrays = load_file(str(fixture / "cases.safetensors"))
    for i, case in enumerate(json.loads((fixture / "cases.json").read_text())):
        obs = {f"observation.images.{cam}": arrays[f"{i}.image.{cam}"] for cam in case["cameras"]}
        obs.update({"observation.state": arrays[f"{i}.state"], "task": case["task"]})
        noise = np.random.default_rng(i).standard_normal(policy.spec.noise_shape, dtype=np.float32)
        np.testing.assert_allclose(policy.predict_chunk(obs, noise), runner.get_action(from_lerobot(obs, policy.spec), noise),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", ["x86-cpu", "x86-gpu", "jetson-thor", "jetson-orin", "jetson-orin-nano"])
@pytest.mark.parametrize("fixture", ["pi0_two_cams", "pi05_two_cams"])
def test_every_default_recipe_fits_a_pi0_teacher(target, fixture):
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.recipes import check_recipe, load_recipe
    from vlacompile.stages import Artifact, BuildContext, distill, prune
    from vlacompile.targets import load_target

    tgt = load_target(target)
    rcp = load_recipe(tgt.default_recipe)
    check_recipe(rcp, tgt)
    teacher = load_policy(FX / fixture / "policy", tokenizer=FX / fixture / "tokenizer")
    train, calib, _ = split_episodes(read_episodes(FX / fixture / "episodes"), seed=0)
    ctx = BuildContext(target=tgt, workdir=Path("."), teacher=teacher, train=train, calibration=calib, log=lambda m: None)
    source, student = teacher, None
    for s in rcp.stages:
        if s.name == "prune":
            source = prune.run(Artifact(policy=teacher), s.params, ctx).policy
        if s.name == "distill":
            student = distill.init_student(source, s.params, ctx)
    if student is not None:
        assert student.config.depth <= teacher.config.depth and student.config.variant == teacher.config.variant
        student.config.validate("test")


CROSS_RECIPE = """
name = "pi0-to-reference"
[[stages]]
stage = "distill"
student = {{ family = "vlacompile-reference", layers = 2, width = 64, heads = 2, image_size = 32, chunk_size = 4 }}
flow_steps = 2
steps = {steps}
batch_size = 16
num_samples = 64
noises_per_sample = 4
[[stages]]
stage = "export"
"""


def test_a_pi0_teacher_distils_into_a_reference_family_student(tmp_path):
    """Another family's student learns from teacher-labelled chunks (flow matching, 4 noise draws per
    observation) and verifies against the teacher on independent noise: trained, it is nearer the
    teacher than the same student untrained."""
    target = _target(tmp_path, "x86-cpu", **{"actions_per_chunk = 8": "actions_per_chunk = 4"})
    reports = {}
    for steps in (0, 150):
        (tmp_path / f"r{steps}.toml").write_text(CROSS_RECIPE.format(steps=steps))
        result = _build(["--target", str(target), "--checkpoint", str(PI0 / "policy"), "--tokenizer", str(PI0 / "tokenizer"),
                         "--episodes", str(PI0 / "episodes"), "--recipe", str(tmp_path / f"r{steps}.toml"),
                         "--out", str(tmp_path / f"out{steps}"), "--no-cache"])
        assert result.exit_code in (EXIT_OK, EXIT_GATE_FAILED), result.output
        reports[steps] = json.loads((tmp_path / f"out{steps}" / "report.json").read_text())
    trained = reports[150]
    assert trained["teacher"]["family"] == "pi0" and trained["student"]["family"] == "vlacompile-reference"
    record = trained["stages"][0]
    assert record["objective"] == "flow" and record["final_loss"] < record["initial_loss"]
    assert trained["accuracy"]["chunk_size"] == 4
    assert any("independent noise draws" in n for n in trained["notes"])
    assert trained["accuracy"]["nmse_vs_teacher"] < reports[0]["accuracy"]["nmse_vs_teacher"]
    # Gated on top of the teacher's own spread across noise draws, which even an exact copy would show.
    gate = next(g for g in trained["gates"]["gates"] if g["name"] == "nmse_vs_teacher")
    own = trained["accuracy"]["teacher_self_consistency"]["nmse"]
    assert gate["limit"] == pytest.approx(0.05 + own) and "independent noise draws" in gate["note"]
    student = load_policy(tmp_path / "out150" / "student")
    assert student.family == "vlacompile-reference" and student.spec.cameras[0].name == "top"


def test_a_cross_family_recipe_that_selects_teacher_layers_is_refused(tmp_path):
    from vlacompile.errors import ConfigError
    from vlacompile.stages import distill

    with pytest.raises(ConfigError, match="shaped by distill.student"):
        distill.check(distill.Params(student={"family": "vlacompile-reference"}, layers={"backbone": 0.5}), None)
    with pytest.raises(ConfigError, match="vlacompile has the families"):
        distill.check(distill.Params(student={"family": "octo"}), None)
    with pytest.raises(ConfigError, match="cannot take"):
        distill.check(distill.Params(student={"family": "vlacompile-reference"}, objective="match"), None)


# -- bad inputs -----------------------------------------------------------------------------


def _copy(tmp_path: Path, fixture: Path = PI0) -> Path:
    ckpt = tmp_path / "policy"
    shutil.copytree(fixture / "policy", ckpt)
    return ckpt


def _edit_pipeline(ckpt: Path, fn) -> None:
    path = ckpt / "policy_preprocessor.json"
    data = json.loads(path.read_text())
    fn(data["steps"])
    path.write_text(json.dumps(data, indent=2))


def test_a_lerobot_04_pipeline_is_refused_not_guessed(tmp_path):
    ckpt = _copy(tmp_path, PI05)
    _edit_pipeline(ckpt, lambda steps: steps.remove(next(s for s in steps if s["registry_name"] == "relative_actions_processor")))
    with pytest.raises(CheckpointError, match="(?s)lerobot 0.4.x.*prompt's state padded"):
        load_policy(ckpt, tokenizer=PI05 / "tokenizer")


def test_relative_actions_are_refused(tmp_path):
    ckpt = _copy(tmp_path)
    _edit_pipeline(ckpt, lambda steps: next(s for s in steps if s["registry_name"] == "relative_actions_processor")["config"]
                   .update(enabled=True))
    with pytest.raises(CheckpointError, match="relative actions"):
        load_policy(ckpt, tokenizer=PI0 / "tokenizer")


def test_a_type_that_does_not_match_the_weights_is_named(tmp_path):
    ckpt = _copy(tmp_path, PI05)
    shutil.copyfile(PI0 / "policy" / "model.safetensors", ckpt / "model.safetensors")  # pi0 weights in a pi0.5 directory
    with pytest.raises(CheckpointError, match="type 'pi05'.*plain \\(pi0\\)"):
        load_policy(ckpt, tokenizer=PI05 / "tokenizer")


def test_stats_of_another_shape_are_named(tmp_path):
    ckpt = _copy(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["input_features"]["observation.state"]["shape"] = [5]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="observation.state.mean has 6 values; the feature's shape is \\[5\\]"):
        load_policy(ckpt, tokenizer=PI0 / "tokenizer")


def test_missing_tokenizer_names_the_hub_repository_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="(?s)google/paligemma-3b-pt-224.*--tokenizer"):
        load_policy(PI0 / "policy")
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="SentencePiece model but no tokenizer.json"):
        load_policy(PI0 / "policy", tokenizer=spm)


def test_the_hub_cache_supplies_the_tokenizer(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--google--paligemma-3b-pt-224" / "snapshots" / "abc"
    shutil.copytree(PI0 / "tokenizer", snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    policy = load_policy(PI0 / "policy")
    assert policy.meta["tokenizer"] == str(snap)
