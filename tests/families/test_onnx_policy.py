"""Any ONNX policy as a teacher: a graph and a manifest mapping LeRobot keys to its inputs. Here the
graph is a pi0 (the lerobot-made fixture) exported by vlacompile, so the ONNX teacher must give
that pi0's chunks; it builds end to end with a student of another family, the report says the
teacher was opaque, and a manifest that does not fit its graph is a clear error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vlacompile.checkpoint import load_policy
from vlacompile.cli import main
from vlacompile.errors import EXIT_GATE_FAILED, EXIT_OK, CheckpointError, ConfigError
from vlacompile.resources import TARGETS_DIR

PI0 = Path(__file__).parent / "pi0" / "fixtures" / "pi0_two_cams"
RECIPE = """
name = "onnx-teacher-to-reference"
[[stages]]
stage = "distill"
student = { family = "vlacompile-reference", layers = 2, width = 64, heads = 2, image_size = 32, chunk_size = 4 }
flow_steps = 2
steps = 40
batch_size = 16
num_samples = 64
noises_per_sample = 2
[[stages]]
stage = "export"
"""

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory):
    from vlacompile.stages.export import export_policy

    root = tmp_path_factory.mktemp("onnx-teacher")
    pi0 = load_policy(PI0 / "policy", tokenizer=PI0 / "tokenizer")
    export_policy(pi0, root / "policy.onnx")
    shutil.copytree(PI0 / "tokenizer", root / "tokenizer")
    manifest = {
        "model_type": "onnx-policy", "graph": "policy.onnx",
        "inputs": {"observation.images.top": "images.top", "observation.images.wrist": "images.wrist",
                   "observation.state": "state", "task": "tokens", "noise": "noise"},
        "token_mask": "token_mask", "tokenizer": "tokenizer", "prompt": "{task}\n", "output": "actions", "chunk_size": 5,
        "action_names": ["a0", "a1", "a2", "a3"], "control_hz": 30,
    }
    (root / "config.json").write_text(json.dumps(manifest, indent=2))
    return root, pi0


def test_the_onnx_teacher_gives_the_chunks_of_the_policy_it_was_exported_from(onnx_teacher):
    root, pi0 = onnx_teacher
    teacher = load_policy(root)
    assert teacher.family == "onnx-policy" and teacher.num_parameters() > 0
    rng = np.random.default_rng(0)
    obs = {"observation.images.top": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
           "observation.images.wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
           "observation.state": rng.standard_normal(6).astype(np.float32), "task": "push"}
    noise = rng.standard_normal(teacher.spec.noise_shape).astype(np.float32)
    np.testing.assert_allclose(teacher.predict_chunk(obs, noise=noise), pi0.predict_chunk(obs, noise=noise), rtol=1e-4, atol=1e-5)


def test_an_onnx_teacher_builds_end_to_end_and_the_report_says_it_was_opaque(onnx_teacher, tmp_path):
    root, _ = onnx_teacher
    (tmp_path / "r.toml").write_text(RECIPE)
    text = (TARGETS_DIR / "x86-cpu.toml").read_text().replace("actions_per_chunk = 8", "actions_per_chunk = 4")
    (tmp_path / "x86.toml").write_text(text)
    result = CliRunner().invoke(main, ["build", "--quiet", "--calls", "20", "--target", str(tmp_path / "x86.toml"),
                                       "--checkpoint", str(root), "--episodes", str(PI0 / "episodes"),
                                       "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (EXIT_OK, EXIT_GATE_FAILED), result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["family"] == "onnx-policy" and report["teacher"]["opaque"] is True
    assert "no layer initialisation, pruning or quantisation" in report["teacher"]["opaque_note"]
    assert report["student"]["family"] == "vlacompile-reference"
    assert report["latency"]["teacher"]["runtime"].startswith("onnxruntime")
    assert report["roofline"]["teacher"] is None
    assert report["stages"][0]["final_loss"] < report["stages"][0]["initial_loss"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "opaque" in md


def test_an_opaque_teacher_refuses_a_same_family_student(onnx_teacher, tmp_path):
    root, _ = onnx_teacher
    from vlacompile.families import get_family

    teacher = load_policy(root)
    with pytest.raises(ConfigError, match="(?s)opaque.*distil it into a student of another family"):
        get_family(teacher.family).resolve_layers(teacher.config, {"backbone": 0.5}, "recipe stage distill")


def test_a_manifest_that_does_not_fit_the_graph_is_named(onnx_teacher, tmp_path):
    root, _ = onnx_teacher
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    manifest = json.loads((bad / "config.json").read_text())
    del manifest["inputs"]["observation.state"]
    (bad / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"takes inputs \['state'\] that the manifest does not map"):
        load_policy(bad)
    manifest["inputs"]["observation.state"] = "state"
    manifest["chunk_size"] = 50
    (bad / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="chunk_size is 50 but the graph emits chunks of 5"):
        load_policy(bad)
    (bad / "policy.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="not a readable ONNX graph"):
        load_policy(bad)
