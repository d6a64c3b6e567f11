"""SmolVLA reproduces lerobot 0.4.4 and lerobot 0.6.1, each under its own semantics: fixtures made
by lerobot (make_fixtures.py with 0.4.4, make_fixtures_061.py with 0.6.1, in the side environment)
against vlacompile's torch teacher, its exported single graph and its split System 2 + System 1
graphs, on the same observations and noise, without lerobot installed.

Three sets of references: fixtures/<name>/cases.safetensors (the policies lerobot 0.4.4 saved, run
by lerobot 0.4.4; compiled with ``lerobot_version="0.4"``), fixtures/<name>/lerobot061.safetensors
(the same checkpoints and inputs run by lerobot 0.6.1; ``lerobot_version="0.6"``) and
fixtures061/<name>/ (policies lerobot 0.6.1 saved and ran; the version is detected from config.json).

The four 0.4.4 configurations differ in cameras (1 or 2, plus a synthetic empty camera), image sizes
(square, wide, tall, resized with padding), state/action dims, chunk size, flow steps, VLM depth,
expert depth (as deep as the VLM, or half), the attention pattern (cross every 2nd or 3rd layer,
all self-attention, all cross-attention), normalisation modes (MEAN_STD, MIN_MAX, QUANTILES,
QUANTILE10, visual MEAN_STD), bf16-stored backbone weights, image special tokens, prefix padding,
a BOS-adding tokenizer and truncation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from vlacompile.checkpoint import load_policy
from vlacompile.families import make_preprocessor
from vlacompile.observation import from_lerobot

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
CONFIGS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
CONFIGS_061 = sorted(p.name for p in (HERE / "fixtures061").iterdir() if p.is_dir())
# (fixture directory, the lerobot version named when loading (None: detected), the reference file)
REFERENCES = {
    **{f"{n}@lerobot-0.4.4": (FIXTURES / n, "0.4", "cases.safetensors") for n in CONFIGS},
    **{f"{n}@lerobot-0.6.1": (FIXTURES / n, "0.6", "lerobot061.safetensors") for n in CONFIGS},
    **{f"{n}@lerobot-0.6.1-saved": (HERE / "fixtures061" / n, None, "cases.safetensors") for n in CONFIGS_061},
}
TOL = 1e-4  # actions agree to 1e-4 of max(1, |action|), FP32

pytestmark = pytest.mark.usefixtures("single_thread")


def cases(key: str):
    """(lerobot observation, lerobot's outputs for it) per case of the reference ``key``."""
    root, _, reference = REFERENCES[key]
    arrays = load_file(str(root / "cases.safetensors"))
    ref = load_file(str(root / reference))
    for i, case in enumerate(json.loads((root / "cases.json").read_text())):
        obs = {f"observation.images.{cam}": arrays[f"{i}.image.{cam}"] for cam in case["cameras"]}
        obs["observation.state"] = arrays[f"{i}.state"]
        obs["task"] = case["task"]
        out = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}.")}
        out.update({k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith(f"{i}.")})
        yield obs, out


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    assert err.max() <= TOL, f"{what}: worst relative error {err.max():.3g} > {TOL}"


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def fixture(request):
    root, version, _ = REFERENCES[request.param]
    return request.param, load_policy(root / "policy", tokenizer=root / "vlm", lerobot_version=version)


def test_the_fixtures_were_made_by_lerobot():
    assert len(CONFIGS) >= 2 and CONFIGS_061
    for name in CONFIGS:
        meta = json.loads((FIXTURES / name / "meta.json").read_text())
        assert meta["lerobot"].startswith("0.4") and meta["generated_by"].endswith("make_fixtures.py")
        meta = json.loads((FIXTURES / name / "lerobot061.json").read_text())
        assert meta["lerobot"] == "0.6.1" and meta["transformers"].startswith("5.") and meta["generated_by"].endswith("make_fixtures_061.py")
    for name in CONFIGS_061:
        meta = json.loads((HERE / "fixtures061" / name / "meta.json").read_text())
        assert meta["lerobot"] == "0.6.1" and meta["generated_by"].endswith("make_fixtures_061.py")
        assert "pretrained_revision" in json.loads((HERE / "fixtures061" / name / "policy" / "config.json").read_text())


def test_each_lerobot_is_reproduced_under_its_own_semantics_only():
    """The same checkpoint and inputs: vlacompile under lerobot 0.4's semantics is lerobot 0.4.4 and
    not lerobot 0.6.1, and the other way round (the patch position ids are the difference)."""
    for key, (root, version, _) in REFERENCES.items():
        if version is None:
            version = "0.6"
        other = {"0.4": "0.6", "0.6": "0.4"}[version]
        right = load_policy(root / "policy", tokenizer=root / "vlm", lerobot_version=version)
        wrong = load_policy(root / "policy", tokenizer=root / "vlm", lerobot_version=other)
        obs, ref = next(cases(key))
        assert np.abs(right.predict_chunk(obs, noise=ref["noise"]) - ref["actions"]).max() < TOL
        assert np.abs(wrong.predict_chunk(obs, noise=ref["noise"]) - ref["actions"]).max() > TOL, key


def test_tokens_and_normalised_state_match_lerobots_preprocessor(fixture):
    import torch

    name, policy = fixture
    pre = make_preprocessor(policy.spec)
    for obs, ref in cases(name):
        feeds = pre(from_lerobot(obs, policy.spec), ref["noise"])
        n = len(ref["tokens"])  # lerobot pads to the longest prompt (one here) or to max_length
        np.testing.assert_array_equal(feeds["tokens"][0][:n][ref["token_mask"] == 1], ref["tokens"][ref["token_mask"] == 1])
        np.testing.assert_array_equal(feeds["token_mask"][0][:n], ref["token_mask"].astype(bool))
        assert not feeds["token_mask"][0][n:].any()
        with torch.no_grad():
            state = policy.module.normalize.state(torch.from_numpy(ref["state"])).numpy()
        np.testing.assert_allclose(state, ref["state_normalized"], rtol=1e-6, atol=1e-6)


def test_torch_teacher_reproduces_lerobots_action_chunks(fixture):
    name, policy = fixture
    for obs, ref in cases(name):
        assert_close(policy.predict_chunk(obs, noise=ref["noise"]), ref["actions"], f"{name} torch")


def test_the_fixture_outputs_depend_on_noise_images_and_state(fixture):
    """A parity check that a constant function would pass is no check: the chunks move with every input."""
    name, policy = fixture
    obs, ref = next(cases(name))
    base = policy.predict_chunk(obs, noise=ref["noise"])
    assert np.abs(policy.predict_chunk(obs, noise=-ref["noise"]) - base).max() > 1e-2
    cam = next(k for k in obs if k.startswith("observation.images."))
    assert np.abs(policy.predict_chunk({**obs, cam: 255 - obs[cam]}, noise=ref["noise"]) - base).max() > 1e-4
    assert np.abs(policy.predict_chunk({**obs, "observation.state": obs["observation.state"] + 1}, noise=ref["noise"]) - base).max() > 1e-3
    assert np.abs(policy.predict_chunk({**obs, "task": "push"if obs["task"] != "push" else "open"}, noise=ref["noise"]) - base).max() > 1e-4


def test_exported_single_and_split_graphs_reproduce_lerobot(fixture, tmp_path):
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.split import SplitRunner
    from vlacompile.stages.export import export_policy, export_split

    name, policy = fixture
    export_policy(policy, tmp_path / "student.onnx")
    export_split(policy, tmp_path)
    single = OrtRunner(tmp_path / "student.onnx", policy.spec, threads=1)
    split = SplitRunner(tmp_path, policy.spec, threads=1)
    for obs, ref in cases(name):
        o = from_lerobot(obs, policy.spec)
        assert_close(single.get_action(o, ref["noise"]), ref["actions"], f"{name} single graph")
        assert_close(split.get_action(o, ref["noise"]), ref["actions"], f"{name} split graphs")


def test_float_frames_are_read_as_lerobot_decodes_them(fixture):
    """LeRobot hands cameras as float [3, H, W] = uint8 / 255; the same frames give the same chunk."""
    name, policy = fixture
    obs, ref = next(cases(name))
    as_float = {k: (v.transpose(2, 0, 1).astype(np.float32) / 255.0 if k.startswith("observation.images.") else v) for k, v in obs.items()}
    np.testing.assert_array_equal(policy.predict_chunk(as_float, noise=ref["noise"]), policy.predict_chunk(obs, noise=ref["noise"]))
