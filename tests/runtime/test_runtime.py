"""The runtime (vlacompile_runtime) runs an artifact as the compiler's ONNX Runtime runners do.

For the reference family (the tiny policy), a SmolVLA policy and a pi0.5 policy (lerobot 0.6.1
fixtures), single graph and split graphs: ``load(dir).predict_chunk(observation, noise)`` on
held-out episodes' observations (and lerobot's cases) equals ``OrtRunner`` / ``SplitRunner`` to
1e-5, and pi0.5's prompt tokens (state normalised and digitised in numpy) equal lerobot's.

With ``VLACOMPILE_RUNTIME_CASES`` set, each artifact, its observations and the compiler's chunks are
also written there, for ``runtime/tests/check_torch_free.py`` in an environment without torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_policy
from runtime_artifacts import export_case, held_out_observations, noises, write_artifact
from safetensors.numpy import load_file

import vlacompile_runtime
from vlacompile.backends.onnxrt import OrtRunner
from vlacompile.backends.split import SplitRunner
from vlacompile.checkpoint import load_policy
from vlacompile.data.episodes import read_episodes
from vlacompile.observation import from_lerobot

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
FAMILIES = Path(__file__).parent.parent / "families"
SMOLVLA = FAMILIES / "smolvla" / "fixtures" / "two_cams_every3"
PI05 = FAMILIES / "pi0" / "fixtures" / "pi05_two_cams"
CASES = ("reference", "smolvla", "pi05")


def lerobot_cases(root: Path) -> list[tuple[dict, dict]]:
    arrays = load_file(str(root / "cases.safetensors"))
    out = []
    for i, case in enumerate(json.loads((root / "cases.json").read_text())):
        obs = {f"observation.images.{cam}": arrays[f"{i}.image.{cam}"] for cam in case["cameras"]}
        obs["observation.state"] = arrays[f"{i}.state"]
        obs["task"] = case["task"]
        out.append((obs, {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}.")}))
    return out


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory, tiny_config, tiny_episode_set):
    """(name, policy, artifact dir, observations, noise, lerobot's references or None)."""
    name = request.param
    refs = None
    if name == "reference":
        policy = make_tiny_policy(tiny_config, tiny_episode_set)
        observations = held_out_observations(tiny_episode_set, policy.spec)
    elif name == "smolvla":
        policy = load_policy(SMOLVLA / "policy", tokenizer=SMOLVLA / "vlm", lerobot_version="0.6")
        refs = lerobot_cases(SMOLVLA)
        observations = [o for o, _ in refs]
    else:
        policy = load_policy(PI05 / "policy", tokenizer=PI05 / "tokenizer")
        refs = lerobot_cases(PI05)
        observations = [o for o, _ in refs] + held_out_observations(read_episodes(PI05 / "episodes"), policy.spec, limit=4)
    noise = [r["noise"] for _, r in refs] if refs else []
    noise += noises(policy.spec, len(observations) - len(noise), seed=1)
    artifact = write_artifact(policy, tmp_path_factory.mktemp(f"artifact-{name}"))
    return name, policy, artifact, observations, noise, refs


def compiler_chunks(policy, artifact: Path, observations, noise) -> dict[str, list[np.ndarray]]:
    runners = {"single": OrtRunner(artifact / "student.onnx", policy.spec, threads=1), "split": SplitRunner(artifact, policy.spec, threads=1)}
    return {g: [r.get_action(from_lerobot(o, policy.spec), z) for o, z in zip(observations, noise)] for g, r in runners.items()}


def test_runtime_equals_the_compilers_onnx_runtime_results(case):
    name, policy, artifact, observations, noise, _ = case
    expected = compiler_chunks(policy, artifact, observations, noise)
    for graph, chunks in expected.items():
        runtime = vlacompile_runtime.load(artifact, threads=1, graph=graph)
        assert runtime.graph == graph
        got = [runtime.predict_chunk(o, noise=z) for o, z in zip(observations, noise)]
        worst = max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, chunks))
        print(f"{name} {graph}: {len(got)} observations, max |runtime - compiler| = {worst:.3g}")
        assert got[0].shape == (policy.spec.chunk_size, policy.spec.action_dim) and got[0].dtype == np.float32
        assert worst <= TOL, f"{name} {graph}: {worst}"
    # The chunks depend on the observation: a parity check a constant would pass is no check.
    assert np.abs(expected["single"][0] - expected["single"][-1]).max() > 1e-4
    if os.environ.get("VLACOMPILE_RUNTIME_CASES"):
        export_case(Path(os.environ["VLACOMPILE_RUNTIME_CASES"]), name, artifact, observations, noise, expected)


LEROBOT_CASES = [c for c in CASES if c != "reference"]  # the reference family's byte tokenizer: no lerobot reference, no file


@pytest.mark.parametrize("case", LEROBOT_CASES, indirect=True)
def test_runtime_prompt_tokens_equal_lerobots(case):
    """SmolVLA: task + "\\n"; pi0.5: the state normalised and digitised in numpy, in the prompt."""
    name, policy, artifact, _, _, refs = case
    assert refs
    runtime = vlacompile_runtime.load(artifact, threads=1)
    for obs, ref in refs:
        feeds = runtime.preprocess(runtime.observation(obs), ref["noise"])
        np.testing.assert_array_equal(feeds["tokens"][0], ref["tokens"])
        np.testing.assert_array_equal(feeds["token_mask"][0], ref["token_mask"].astype(bool))


def test_spec_says_what_the_robot_must_hand_over(case):
    name, policy, artifact, *_ = case
    runtime = vlacompile_runtime.load(artifact, threads=1)
    assert runtime.spec == policy.spec.__class__.from_dict({**policy.spec.to_dict(), "processor": runtime.spec.processor_settings})
    assert [(c.name, c.height, c.width) for c in runtime.spec.cameras] == [(c.name, c.height, c.width) for c in policy.spec.cameras]
    assert runtime.actions_per_chunk == min(8, policy.spec.chunk_size)  # x86-cpu's budget: 8 actions per chunk at 30 Hz
    assert runtime.control_hz == 30
    for cam in runtime.spec.cameras:
        assert f"{cam.name} {cam.height}x{cam.width}" in repr(runtime)


@pytest.mark.parametrize("case", LEROBOT_CASES, indirect=True)
def test_a_missing_or_changed_tokenizer_file_is_named(case, tmp_path):
    import shutil

    from vlacompile_runtime.errors import ArtifactError

    name, _, artifact, *_ = case
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    tok = copy / "student" / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")
    with pytest.raises(ArtifactError, match="differ from those manifest.json recorded") as err:
        vlacompile_runtime.load(copy)
    assert err.value.source == str(tok)
    tok.unlink()
    with pytest.raises(ArtifactError, match="student/tokenizer/tokenizer.json"):
        vlacompile_runtime.load(copy)
