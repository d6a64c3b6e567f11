"""A SmolVLA policy written by lerobot builds end to end on episodes written by lerobot: for
x86-cpu (measured, exit 0 or 1) and Jetson Thor (split graphs with INT8 Q/DQ, readiness checked,
estimated: exit 3); every target's default recipe fits a SmolVLA teacher; bad inputs are clear
errors that leave earlier output untouched."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vlacompile.checkpoint import load_policy
from vlacompile.cli import main
from vlacompile.errors import EXIT_GATE_FAILED, EXIT_INPUT_ERROR, EXIT_OK, EXIT_UNVERIFIED, CheckpointError
from vlacompile.resources import TARGETS_DIR

FX = Path(__file__).parent / "fixtures" / "one_cam_cross_every2"
POLICY, VLM, EPISODES = FX / "policy", FX / "vlm", FX / "episodes"

RECIPE = """
name = "tiny-smolvla"
[[stages]]
stage = "distill"
layers = { vision = 0.5, backbone = 0.5 }
mlp_ratio = 0.5
flow_steps = 2
steps = 30
batch_size = 8
num_samples = 64
[[stages]]
stage = "export"
"""
THOR_RECIPE = """
name = "tiny-smolvla-thor"
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
    # The fixtures were saved by lerobot 0.4.4, whose config.json does not say which lerobot runs them.
    result = CliRunner().invoke(main, ["build", "--quiet", "--calls", "20", "--lerobot-version", "0.4", *args])
    assert "Traceback" not in result.output, result.output
    return result


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _target(tmp: Path, name: str, **replace) -> Path:
    text = (TARGETS_DIR / f"{name}.toml").read_text()
    for a, b in replace.items():
        text = text.replace(a, b)
    path = tmp / f"{name}-test.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cpu_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smolvla-cpu")
    (tmp / "r.toml").write_text(RECIPE)
    target = _target(tmp, "x86-cpu", **{"max_nmse = 0.05": "max_nmse = 10.0", "min_cosine = 0.95": "min_cosine = -1.0"})
    result = _build(["--target", str(target), "--checkpoint", str(POLICY), "--tokenizer", str(VLM), "--episodes", str(EPISODES),
                     "--recipe", str(tmp / "r.toml"), "--out", str(tmp / "out")])
    return tmp, result


def test_smolvla_builds_for_x86_cpu_and_the_report_names_the_family(cpu_build):
    tmp, result = cpu_build
    assert result.exit_code in (EXIT_OK, EXIT_GATE_FAILED), result.output
    out = tmp / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["family"] == "smolvla" and report["teacher"]["label"] == "LeRobot SmolVLA"
    assert "lerobot SmolVLA policy directory" in report["teacher"]["format"]
    assert report["student"]["flow_steps"] == 2 and report["latency"]["student"]["kind"] == "measured"
    assert 0 <= report["accuracy"]["nmse_vs_teacher"] < 10
    assert report["student"]["config"]["model_type"] == "smolvla"
    # The semantics the user named are the teacher's and the student's, in the report and the manifest.
    assert report["teacher"]["lerobot_version"] == report["student"]["lerobot_version"] == "0.4"
    assert "named (--lerobot-version 0.4)" in report["teacher"]["lerobot_semantics"]
    assert report["student"]["config"]["patch_positions"] == "transformers4"
    assert json.loads((out / "manifest.json").read_text())["inputs"]["lerobot_version"] == "0.4"
    # mlp_ratio 0.5 narrows the expert's MLP, which lerobot cannot express: the log and the report say so.
    gap = [n for n in report["notes"] if "lerobot cannot load this student" in n]
    assert gap and "expert's MLP widths" in gap[0] and "warning: student/: lerobot cannot load" in result.output
    # student_spec.json names the tokenizer the artifact carries, relative to the artifact.
    assert json.loads((out / "student_spec.json").read_text())["processor"]["tokenizer_dir"] == "student/vlm"
    from vlacompile.artifact import read_student_spec
    from vlacompile.families import make_preprocessor
    from vlacompile.policy import PolicySpec

    copied = tmp / "copied"
    shutil.copytree(out, copied)
    spec = PolicySpec.from_dict(read_student_spec(copied / "student_spec.json"))
    assert spec.processor_settings["tokenizer_dir"] == str(copied / "student" / "vlm")
    assert make_preprocessor(spec).tokens("push")[1].any()
    # The student is a self-contained lerobot-layout directory: it loads without --tokenizer and is
    # the network student.onnx computes.
    student = load_policy(out / "student")
    assert student.config.num_vlm_layers == 2 and student.config.vision_layers == 1
    assert (out / "student" / "policy_preprocessor.json").is_file() and (out / "student" / "vlm" / "tokenizer.json").is_file()
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.quantizers import sample_inputs
    from vlacompile.data import read_episodes

    x = sample_inputs(student.spec, read_episodes(EPISODES), 4, seed=1)
    np.testing.assert_allclose(OrtRunner(out / "student.onnx", student.spec, threads=1).run_batched(x),
                               student.run_feeds(x).numpy(), rtol=1e-4, atol=1e-5)


def test_smolvla_builds_for_jetson_thor_with_split_int8_graphs(tmp_path):
    (tmp_path / "r.toml").write_text(THOR_RECIPE)
    thor = _target(tmp_path, "jetson-thor", **{"actions_per_chunk = 16": "actions_per_chunk = 8",
                                                "max_nmse = 0.05": "max_nmse = 10.0", "min_cosine = 0.95": "min_cosine = -1.0"})
    result = _build(["--target", str(thor), "--checkpoint", str(POLICY), "--tokenizer", str(VLM), "--episodes", str(EPISODES),
                     "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "thor"), "--no-cache"])
    assert result.exit_code == EXIT_UNVERIFIED, result.output
    out = tmp_path / "thor"
    report = json.loads((out / "report.json").read_text())
    assert {"student.onnx", "system2.onnx", "system1.onnx", "split.json"} <= {p.name for p in out.iterdir()}
    assert all(r["ready"] for r in report["tensorrt_readiness"].values()), report["tensorrt_readiness"]
    split = json.loads((out / "split.json").read_text())
    assert split["integrator"]["times"][0] == 1.0 and split["integrator"]["update"]["value"] == -0.5  # t from 1 to 0, 2 steps
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "system1.onnx"), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or "DequantizeLinear" in ops
    roof = report["roofline"]["student"]
    assert roof["system2"]["ms"]["value"] > 0 and roof["system1"]["steps"] == 2
    assert report["latency"]["student"]["kind"] == "estimated"


@pytest.mark.parametrize("target", ["x86-cpu", "x86-gpu", "jetson-thor", "jetson-orin", "jetson-orin-nano"])
def test_every_default_recipe_fits_a_smolvla_teacher(target):
    """Without --recipe: the recipe checks against the target, its prune stage (Orin) runs on a SmolVLA,
    and its distill student is a valid SmolVLA with half the VLM layers."""
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.recipes import check_recipe, load_recipe
    from vlacompile.stages import Artifact, BuildContext, distill, prune
    from vlacompile.targets import load_target

    tgt = load_target(target)
    rcp = load_recipe(tgt.default_recipe)
    check_recipe(rcp, tgt)
    teacher = load_policy(POLICY, tokenizer=VLM, lerobot_version="0.4")
    train, calib, _ = split_episodes(read_episodes(EPISODES), seed=0)
    ctx = BuildContext(target=tgt, workdir=Path("."), teacher=teacher, train=train, calibration=calib, log=lambda m: None)
    source = teacher
    for s in rcp.stages:
        if s.name == "prune":
            art = prune.run(Artifact(policy=teacher), s.params, ctx)
            source = art.policy
            assert art.records[-1]["removed"]["mlp_channels"] > 0
        if s.name == "distill":
            student = distill.init_student(source, s.params, ctx)
    cfg = student.config
    assert cfg.num_vlm_layers == 2 and cfg.num_expert_layers == 2 and cfg.num_steps == 2 and cfg.vision_layers == 1
    cfg.validate("test")


def test_unknown_lerobot_type_is_named(tmp_path):
    ckpt = tmp_path / "groot"
    shutil.copytree(POLICY, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "type": "groot"}))
    with pytest.raises(CheckpointError, match="(?s)a lerobot `groot` checkpoint.*GR00T.*vlacompile supports.*LeRobot SmolVLA"):
        load_policy(ckpt, tokenizer=VLM, lerobot_version="0.4")


def test_missing_tokenizer_names_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"}))
    with pytest.raises(CheckpointError, match="--tokenizer") as e:
        load_policy(ckpt)
    assert "never downloads" in str(e.value)
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load_policy(ckpt, tokenizer=tmp_path)


def test_the_hub_cache_is_found_offline(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolVLM2-500M-Video-Instruct" / "snapshots" / "abc123"
    shutil.copytree(VLM, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"}))
    assert load_policy(ckpt, lerobot_version="0.4").meta["tokenizer"] == str(snap)


def test_stats_that_miss_a_feature_are_refused_unless_allowed(tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    stats = ckpt / "policy_preprocessor_step_5_normalizer_processor.safetensors"
    # What lerobot/smolvla_base's file looks like: dataset-qualified keys, none for observation.state.
    save_file({f"so100.buffer.{k}": v for k, v in load_file(str(stats)).items()}, str(stats))
    with pytest.raises(CheckpointError, match="(?s)do not cover observation.state.*so100") as e:
        load_policy(ckpt, tokenizer=VLM, lerobot_version="0.4")
    assert "--allow-unnormalized" in str(e.value) and stats.name in str(e.value)
    policy = load_policy(ckpt, tokenizer=VLM, allow_unnormalized=True, lerobot_version="0.4")
    assert policy.config.state_norm == "IDENTITY" and any("unnormalised" in n for n in policy.meta["notes"])


def test_legacy_and_foreign_pipelines_are_clear_errors(tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(POLICY, legacy)
    for f in legacy.glob("policy_*"):
        f.unlink()
    from safetensors.numpy import load_file, save_file

    w = load_file(str(legacy / "model.safetensors"))
    save_file({**w, "normalize_inputs.buffer_observation_state.mean": np.zeros(6, np.float32)}, str(legacy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)lerobot <= 0.3.*migrate_policy_normalization"):
        load_policy(legacy, tokenizer=VLM, lerobot_version="0.4")

    foreign = tmp_path / "foreign"
    shutil.copytree(POLICY, foreign)
    pre = json.loads((foreign / "policy_preprocessor.json").read_text())
    pre["steps"].insert(1, {"registry_name": "image_crop_processor", "config": {}})
    (foreign / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="(?s)image_crop_processor.*does not implement"):
        load_policy(foreign, tokenizer=VLM, lerobot_version="0.4")


def test_truncated_weights_fail_the_build_and_leave_the_output(cpu_build, tmp_path):
    tmp, _ = cpu_build
    out = tmp / "out"
    before = _hashes(out)
    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = _build(["--checkpoint", str(ckpt), "--tokenizer", str(VLM), "--episodes", str(EPISODES), "--recipe", str(tmp / "r.toml"),
                     "--out", str(out)])
    assert result.exit_code == EXIT_INPUT_ERROR and "truncated or corrupt" in result.output and "Hint:" in result.output
    assert _hashes(out) == before


def test_episodes_without_the_policys_camera_are_refused(tmp_path):
    from vlacompile.data import read_episodes

    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    feats = config["input_features"]
    feats["observation.images.wrist"] = feats.pop("observation.images.top")
    (ckpt / "config.json").write_text(json.dumps(config))
    for name in ("policy_preprocessor.json",):
        pre = json.loads((ckpt / name).read_text())
        for s in pre["steps"]:
            f = s["config"].get("features")
            if f and "observation.images.top" in f:
                f["observation.images.wrist"] = f.pop("observation.images.top")
        (ckpt / name).write_text(json.dumps(pre))
    result = _build(["--checkpoint", str(ckpt), "--tokenizer", str(VLM), "--episodes", str(EPISODES), "--out", str(tmp_path / "o"),
                     "--no-closed-loop"])
    assert result.exit_code == EXIT_INPUT_ERROR and "wrist" in result.output and "top" in result.output
    assert read_episodes(EPISODES).camera_names == ("top",)


def _renamed_camera_policy(tmp_path: Path, new: str) -> Path:
    """The fixture policy reading its one camera as observation.images.<new>."""
    ckpt = tmp_path / "policy"
    shutil.copytree(POLICY, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["input_features"][f"observation.images.{new}"] = config["input_features"].pop("observation.images.top")
    (ckpt / "config.json").write_text(json.dumps(config))
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    for s in pre["steps"]:
        f = s["config"].get("features")
        if f and "observation.images.top" in f:
            f[f"observation.images.{new}"] = f.pop("observation.images.top")
    (ckpt / "policy_preprocessor.json").write_text(json.dumps(pre))
    return ckpt


def test_smolvla_builds_on_lerobot_video_episodes_through_a_camera_map(tmp_path):
    """lerobot's default dataset format (AV1 MP4s), a camera named differently than the policy's."""
    ckpt = _renamed_camera_policy(tmp_path, "wrist")
    (tmp_path / "r.toml").write_text(RECIPE.replace("steps = 30", "steps = 4").replace("num_samples = 64", "num_samples = 16"))
    target = _target(tmp_path, "x86-cpu", **{"max_nmse = 0.05": "max_nmse = 10.0", "min_cosine = 0.95": "min_cosine = -1.0"})
    video = FX / "episodes_video"
    args = ["--target", str(target), "--checkpoint", str(ckpt), "--tokenizer", str(VLM), "--episodes", str(video),
            "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"), "--no-cache"]
    refused = _build(args + ["--camera-map", "wrist=hand"])
    assert refused.exit_code == EXIT_INPUT_ERROR and "no camera 'hand'" in refused.output and "observation.images.top" in refused.output
    assert not (tmp_path / "out").exists()
    result = _build(args + ["--camera-map", "wrist=observation.images.top"])
    assert result.exit_code in (EXIT_OK, EXIT_GATE_FAILED), result.output
    assert "video frames in" in result.output  # decode time is in the build log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["episodes"]["cameras"]["wrist"] == {"feature": "observation.images.top", "storage": "video", "height": 48, "width": 64}
    assert report["episodes"]["camera_map"] == {"wrist": "observation.images.top"}
