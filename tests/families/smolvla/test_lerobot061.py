"""lerobot 0.6.1 loads the SmolVLA students vlacompile writes, and computes vlacompile's chunks;
which lerobot's semantics a checkpoint is compiled with is detected or named, never guessed.

students061/ (make_fixtures_061.py, lerobot 0.6.1 in the side environment) holds, per student: the
sha256 of every file lerobot read, the keys it logged as missing or unexpected, and its chunks on
the teacher's cases. The student is a sliced copy of a committed teacher (no training), so this test
rebuilds it, checks that vlacompile writes those same bytes today, and compares its chunks with
lerobot's. Without lerobot installed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from lerobot_students import build_student
from safetensors.numpy import load_file

from vlacompile.checkpoint import load_policy
from vlacompile.errors import CheckpointError, ConfigError

HERE = Path(__file__).parent
STUDENTS = HERE / "students061"
TEACHER061 = HERE / "fixtures061" / "two_cams_061"
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


def _hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _chunks(policy, fixture: Path):
    arrays = load_file(str(fixture / "cases.safetensors"))
    for i, case in enumerate(json.loads((fixture / "cases.json").read_text())):
        obs = {f"observation.images.{cam}": arrays[f"{i}.image.{cam}"] for cam in case["cameras"]}
        obs["observation.state"] = arrays[f"{i}.state"]
        obs["task"] = case["task"]
        yield i, policy.predict_chunk(obs, noise=arrays[f"{i}.noise"])


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDENTS.glob("*.json")))
def test_lerobot_061_loads_vlacompiles_student_and_computes_its_chunks(name, tmp_path):
    record = json.loads((STUDENTS / f"{name}.json").read_text())
    assert record["lerobot"] == "0.6.1" and record["generated_by"].endswith("make_fixtures_061.py")
    spec = record["student"]
    student, gaps = build_student(HERE / spec["teacher"], spec, tmp_path / name)
    assert _hashes(tmp_path / name) == record["files"], (
        "vlacompile no longer writes the student lerobot 0.6.1 loaded: regenerate students061/ with make_fixtures_061.py")
    assert gaps == record["vlacompile_gaps"]
    if not record["loaded"]:
        # lerobot builds one MLP width per part: it refuses the student, and vlacompile said why.
        assert gaps and "size mismatch" in record["error"] and "mlp" in record["error"]
        return
    assert gaps == []
    # No missing keys beyond those lerobot itself leaves missing for a policy it saved; none unexpected.
    assert set(record["lerobot_keys"]["missing"]) <= set(record["lerobot_keys_of_its_own_save"]["missing"])
    assert record["lerobot_keys"]["unexpected"] == []
    assert record["vision_layers_built"] == student.config.vision_layers  # the depth lerobot read from student/vlm
    lerobot = load_file(str(STUDENTS / f"{name}.safetensors"))
    reloaded = load_policy(tmp_path / name)  # as a user loads it: no --tokenizer, no --lerobot-version
    assert reloaded.config.patch_positions == "transformers5" and reloaded.meta["lerobot_version"] in ("0.6", "0.5")
    worst = 0.0
    for i, got in _chunks(reloaded, HERE / spec["teacher"]):
        want = lerobot[f"{i}.actions"]
        worst = max(worst, float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max()))
    assert worst <= TOL, f"{name}: vlacompile's student vs lerobot 0.6.1's chunks: {worst:.3g}"


def test_the_student_says_its_depths_where_lerobot_reads_them(tmp_path):
    spec = json.loads((STUDENTS / "half_layers_narrow_mlp.json").read_text())["student"]
    student, _ = build_student(HERE / spec["teacher"], spec, tmp_path / "s")
    cfg = student.config
    vlm = json.loads((tmp_path / "s" / "vlm" / "config.json").read_text())
    assert vlm["vision_config"]["num_hidden_layers"] == cfg.vision_layers < 3
    assert vlm["vision_config"]["intermediate_size"] == 64 and vlm["text_config"]["intermediate_size"] == 128
    assert vlm["text_config"]["num_hidden_layers"] == cfg.num_vlm_layers
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_vlm_layers"] == cfg.num_vlm_layers and config["vlm_model_name"] == "vlm"
    pre = json.loads((tmp_path / "s" / "policy_preprocessor.json").read_text())
    assert [s["config"]["tokenizer_name"] for s in pre["steps"] if s["registry_name"] == "tokenizer_processor"] == ["vlm"]
    sidecar = json.loads((tmp_path / "s" / "vlacompile.json").read_text())
    assert sidecar["patch_positions"] == "transformers5" and sidecar["lerobot_version"] == "0.6"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / "model.safetensors"), "np") as f:
        assert "model.vlm_with_expert.vlm.lm_head.weight" in f.keys()  # unused by SmolVLA, but lerobot stores it


def test_a_checkpoint_saved_by_lerobot_06_is_detected():
    policy = load_policy(TEACHER061 / "policy", tokenizer=TEACHER061 / "vlm")
    assert policy.config.patch_positions == "transformers5" and policy.meta["lerobot_version"] == "0.6"
    assert "detected" in policy.meta["lerobot_semantics"] and "pretrained_revision" in policy.meta["lerobot_semantics"]


def test_a_checkpoint_that_does_not_say_is_refused_until_the_version_is_named(tmp_path):
    fx = HERE / "fixtures" / "one_cam_cross_every2"  # saved by lerobot 0.4.4: no pretrained_revision
    with pytest.raises(CheckpointError, match="(?s)does not say which lerobot.*--lerobot-version") as e:
        load_policy(fx / "policy", tokenizer=fx / "vlm")
    assert "transformers 4" in str(e.value) and "transformers 5" in str(e.value)
    assert load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.4.4").config.patch_positions == "transformers4"
    assert load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="v0.5.1").config.patch_positions == "transformers5"
    with pytest.raises(ConfigError, match="0.4, 0.5, 0.6"):
        load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.3")


def test_naming_04_for_a_06_checkpoint_is_honoured_and_noted():
    policy = load_policy(TEACHER061 / "policy", tokenizer=TEACHER061 / "vlm", lerobot_version="0.4")
    assert policy.config.patch_positions == "transformers4"
    assert any("pretrained_revision" in n for n in policy.meta["notes"])


def test_the_version_changes_the_cache_identity():
    fx = HERE / "fixtures" / "half_expert"
    a = load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.4")
    b = load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.6")
    assert a.meta["weights_sha256"] == b.meta["weights_sha256"] and a.meta["definition_sha256"] != b.meta["definition_sha256"]


def test_the_option_is_refused_for_other_families():
    pi0 = HERE.parent / "pi0" / "fixtures" / "pi0_two_cams"
    with pytest.raises(ConfigError, match="applies to LeRobot SmolVLA"):
        load_policy(pi0 / "policy", tokenizer=pi0 / "tokenizer", lerobot_version="0.6")


def test_a_student_is_self_describing_after_a_copy(tmp_path):
    spec = json.loads((STUDENTS / "half_layers_061.json").read_text())["student"]
    build_student(HERE / spec["teacher"], spec, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    again = load_policy(tmp_path / "b")
    assert again.meta["tokenizer"] == str(tmp_path / "b" / "vlm") and again.config.patch_positions == "transformers5"
