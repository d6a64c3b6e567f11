"""The runtime's contract beyond parity: select_action's chunk queue, and a clear error naming the
file or key for every bad artifact and every bad observation (never a crash deep inside)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_policy
from runtime_artifacts import held_out_observations, write_artifact

import vlacompile_runtime
from vlacompile_runtime.errors import ArtifactError, ObservationError

pytestmark = pytest.mark.usefixtures("single_thread")

RUNTIME_ROOT = Path(__file__).resolve().parents[2] / "runtime"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_config, tiny_episode_set) -> Path:
    policy = make_tiny_policy(tiny_config, tiny_episode_set)
    return write_artifact(policy, tmp_path_factory.mktemp("artifact") / "x86-cpu")


@pytest.fixture(scope="module")
def observation(artifact, tiny_episode_set):
    spec = vlacompile_runtime.load(artifact, threads=1).spec
    return held_out_observations(tiny_episode_set, spec, limit=1)[0]


@pytest.fixture()
def copy(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


# -- select_action -----------------------------------------------------------------------------


def test_select_action_executes_actions_per_chunk_then_replans(artifact, observation):
    policy = vlacompile_runtime.load(artifact, threads=1, seed=5)
    twin = vlacompile_runtime.load(artifact, threads=1, seed=5)  # the same noise draws
    n = policy.actions_per_chunk
    assert n == 8 and policy.spec.chunk_size == 8
    policy.actions_per_chunk = n = 3  # execute 3 of the 8, then re-plan
    calls = []
    run = policy._run
    policy._run = lambda feeds: calls.append(feeds["state"].copy()) or run(feeds)
    first = twin.predict_chunk(observation)
    got = [policy.select_action(observation) for _ in range(n)]
    assert len(calls) == 1
    np.testing.assert_array_equal(np.stack(got), first[:n])
    moved = {**observation, "observation.state": observation["observation.state"] + 1}
    second = twin.predict_chunk(moved)
    nxt = policy.select_action(moved)  # the queue is empty: plans from this observation
    assert len(calls) == 2 and np.array_equal(calls[-1][0], moved["observation.state"])
    np.testing.assert_array_equal(nxt, second[0])
    policy.reset()  # a new episode: the queued actions are dropped
    policy.select_action(observation)
    assert len(calls) == 3
    assert nxt.shape == (policy.spec.action_dim,) and nxt.dtype == np.float32


def test_noise_none_draws_from_the_seeded_generator(artifact, observation):
    a = vlacompile_runtime.load(artifact, threads=1, seed=1).predict_chunk(observation)
    b = vlacompile_runtime.load(artifact, threads=1, seed=1).predict_chunk(observation)
    c = vlacompile_runtime.load(artifact, threads=1, seed=2).predict_chunk(observation)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


# -- bad artifacts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student.onnx", "student_spec.json", "manifest.json", "split.json", "system1.onnx"])
def test_a_missing_file_is_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(ArtifactError) as err:
        vlacompile_runtime.load(copy, graph="split" if name in ("split.json", "system1.onnx") else "single")
    assert name in str(err.value) and "Hint:" in str(err.value)


@pytest.mark.parametrize("name", ["student.onnx", "system2.onnx", "split.json", "student_spec.json"])
def test_a_file_whose_bytes_differ_from_the_manifest_is_refused(copy, name):
    with open(copy / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="differ from those manifest.json recorded") as err:
        vlacompile_runtime.load(copy, graph="single" if name == "student.onnx" else "split")
    assert err.value.source == str(copy / name)


def test_a_newer_format_version_is_refused_naming_both(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = vlacompile_runtime.FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as err:
        vlacompile_runtime.load(copy)
    msg = str(err.value)
    assert f"format_version {vlacompile_runtime.FORMAT_VERSION + 1}" in msg and f"reads format {vlacompile_runtime.FORMAT_VERSION}" in msg
    assert "manifest.json" in msg


def test_an_artifact_without_a_format_version_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["format_version"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version"):
        vlacompile_runtime.load(copy)


def test_a_truncated_spec_is_named(copy):
    (copy / "student_spec.json").write_text("{}")
    with pytest.raises(ArtifactError, match="student_spec.json"):
        vlacompile_runtime.load(copy, check_hashes=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        vlacompile_runtime.load(tmp_path / "nowhere")


# -- bad observations --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(artifact):
    return vlacompile_runtime.load(artifact, threads=1)


def bad(policy, observation, key, **change):
    with pytest.raises(ObservationError) as err:
        policy.predict_chunk({**observation, **change} if change else observation)
    assert key in str(err.value) and "Hint:" in str(err.value), str(err.value)
    return str(err.value)


def test_a_missing_camera_is_named(policy, observation):
    obs = {k: v for k, v in observation.items() if k != "observation.images.front"}
    bad(policy, obs, "observation.images.front")


def test_a_missing_state_or_task_is_named(policy, observation):
    bad(policy, {k: v for k, v in observation.items() if k != "observation.state"}, "observation.state")
    bad(policy, {k: v for k, v in observation.items() if k != "task"}, "task")


def test_a_frame_of_the_wrong_size_is_named(policy, observation):
    msg = bad(policy, observation, "observation.images.front", **{"observation.images.front": np.zeros((48, 32, 3), np.uint8)})
    assert "48x32" in msg and "32x32" in msg


@pytest.mark.parametrize("frame", [np.zeros((32, 32, 3), np.float64), np.zeros((32, 32, 3), np.uint16),
                                   np.full((3, 32, 32), 0.3, np.float32), np.zeros((32, 32), np.uint8)])
def test_a_frame_of_the_wrong_dtype_or_layout_is_named(policy, observation, frame):
    bad(policy, observation, "observation.images.front", **{"observation.images.front": frame})


def test_a_nan_state_is_named(policy, observation):
    state = observation["observation.state"].copy()
    state[2] = np.nan
    msg = bad(policy, observation, "observation.state", **{"observation.state": state})
    assert "index [2]" in msg


def test_a_state_of_the_wrong_length_or_dtype_is_named(policy, observation):
    bad(policy, observation, "observation.state", **{"observation.state": np.zeros(5, np.float32)})
    bad(policy, observation, "observation.state", **{"observation.state": np.array(["a"] * 6)})


def test_bad_noise_and_task_are_named(policy, observation):
    with pytest.raises(ObservationError, match="noise"):
        policy.predict_chunk(observation, noise=np.zeros((3, 3), np.float32))
    with pytest.raises(ObservationError, match="noise"):
        policy.predict_chunk(observation, noise=np.full(policy.spec.noise_shape, np.nan, np.float32))
    bad(policy, observation, "task", task=3)


def test_float_frames_as_lerobot_decodes_them_give_the_same_chunk(policy, observation):
    noise = np.zeros(policy.spec.noise_shape, np.float32)
    as_float = {**observation, "observation.images.front": observation["observation.images.front"].transpose(2, 0, 1) / np.float32(255)}
    np.testing.assert_array_equal(policy.predict_chunk(as_float, noise), policy.predict_chunk(observation, noise))


# -- lean ---------------------------------------------------------------------------------------


def test_the_runtime_imports_neither_torch_nor_the_compiler(artifact, observation, tmp_path):
    np.savez(tmp_path / "obs.npz", **{k: v for k, v in observation.items() if k != "task"})
    code = (
        "import sys, numpy as np, vlacompile_runtime\n"
        f"obs = dict(np.load({str(tmp_path / 'obs.npz')!r})); obs['task'] = {observation['task']!r}\n"
        f"p = vlacompile_runtime.load({str(artifact)!r}, threads=1)\n"
        "p.select_action(obs); p.predict_chunk(obs); vlacompile_runtime.load(p.directory, graph='split').predict_chunk(obs)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vlacompile', 'onnx', 'transformers'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=RUNTIME_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_every_family_has_a_runtime_preprocessor():
    """The runtime picks a preprocessor by spec.family without importing the family: a family the
    compiler registers must have one here (its Family.preprocessor returns it, or a subclass)."""
    from vlacompile.families import known_families
    from vlacompile_runtime.processors import PREPROCESSORS

    assert set(known_families()) <= set(PREPROCESSORS)
