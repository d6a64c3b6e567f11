"""TensorRT plans. The CPU part runs everywhere: the engine.json compatibility check against a fake
device, the missing-TensorRT message, and the CLI's failure. The GPU part (engine build, plan
execution against ONNX Runtime, timing-cache pinning) runs only where TensorRT and CUDA exist."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_policy

from vlacompile.errors import MissingDependencyError
from vlacompile.trt import EngineError
from vlacompile.trt.engine import (
    ENGINE_JSON,
    check_compatible,
    import_tensorrt,
    read_engine_manifest,
)

THOR = {"tensorrt": "10.13.0.35", "cuda": "13.0", "gpu": "NVIDIA Thor", "compute_capability": "11.0", "driver": "580.00"}
ORIN = {"tensorrt": "10.3.0.30", "cuda": "12.6", "gpu": "Orin (nvgpu)", "compute_capability": "8.7", "driver": "540.4.0"}


def test_compatible_device_passes():
    check_compatible({"device": dict(THOR), "plans": {}}, {**THOR, "driver": "581.00"}, "student.plan")  # driver may differ


def test_plan_for_another_tensorrt_and_gpu_is_refused_naming_both(tmp_path):
    (tmp_path / ENGINE_JSON).write_text(json.dumps({"device": THOR, "plans": {"student.plan": {"sha256": "x"}}}))
    manifest = read_engine_manifest(tmp_path)
    with pytest.raises(EngineError) as e:
        check_compatible(manifest, ORIN, tmp_path / "student.plan")
    msg = str(e.value)
    assert "TensorRT 10.13.0.35 (this device: 10.3.0.30)" in msg
    assert "compute capability 11.0 (this device: 8.7)" in msg
    assert "NVIDIA Thor" in msg and "vlacompile engine" in msg


def test_only_the_tensorrt_version_differs(tmp_path):
    with pytest.raises(EngineError, match=r"TensorRT 10.13.0.35 \(this device: 10.14.1\)") as e:
        check_compatible({"device": THOR}, {**THOR, "tensorrt": "10.14.1"}, "p.plan")
    assert "compute capability" not in str(e.value)


def test_missing_or_broken_engine_json(tmp_path):
    with pytest.raises(EngineError, match="no engine.json"):
        read_engine_manifest(tmp_path)
    (tmp_path / ENGINE_JSON).write_text("{")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_engine_manifest(tmp_path)


def test_missing_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail even where it is installed
    with pytest.raises(MissingDependencyError) as e:
        import_tensorrt()
    assert "TensorRT is not installed" in str(e.value)
    assert "pip install 'vlacompile[gpu]'" in str(e.value) and "NVIDIA GPU" in str(e.value)


def test_engine_command_without_tensorrt_exits_2_with_the_hint(monkeypatch, tmp_path):
    from vlacompile.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "manifest.json").write_text(json.dumps({"onnx": "student.onnx", "precision": "int8"}))
    result = CliRunner().invoke(main, ["engine", str(tmp_path), "--workspace-mb", "256"])
    assert result.exit_code == 2
    assert "vlacompile[gpu]" in result.output


def test_importing_the_tensorrt_backend_needs_no_tensorrt():
    import vlacompile.backends.tensorrt
    import vlacompile.trt.engine  # noqa: F401


# ---------------------------------------------------------------------------------------------
# On a GPU machine


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("tensorrt", reason="TensorRT needs an NVIDIA GPU; not installable on this CPU machine")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA device is visible")


@pytest.fixture(scope="module")
def int8_artifact(gpu, tiny_config, tiny_episode_set, tmp_path_factory):
    from vlacompile.stages import Artifact, BuildContext
    from vlacompile.stages import export as export_stage
    from vlacompile.stages import quantize as quantize_stage
    from vlacompile.targets import load_target

    policy = make_tiny_policy(tiny_config, tiny_episode_set)
    out = tmp_path_factory.mktemp("gpu-int8")
    ctx = BuildContext(target=load_target("x86-gpu"), workdir=out, teacher=policy, calibration=tiny_episode_set, log=lambda m: None)
    art = quantize_stage.run(Artifact(policy=policy), quantize_stage.Params(precision="int8", calibration_samples=16), ctx)
    art = export_stage.run(art, export_stage.Params(split=True), ctx)
    (out / "manifest.json").write_text(json.dumps({"onnx": art.onnx_path.name, "precision": "int8"}))
    return out, art


def test_engine_build_run_and_pinned_timing_cache(int8_artifact, tiny_episode_set):
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.split import SplitRunner
    from vlacompile.backends.tensorrt import TrtRunner, TrtSplitRunner
    from vlacompile.quantizers import sample_inputs
    from vlacompile.trt.engine import build_artifact_engines, build_engine, load_plan

    out, art = int8_artifact
    cache = out / "timing.cache"
    built = build_artifact_engines(out, workspace_mb=512, timing_cache=cache, log=lambda m: None)
    assert set(built) == {"student.plan", "system2.plan", "system1.plan"}
    entry = built["student.plan"]
    assert entry["strongly_typed"] and entry["precision"] == "int8" and entry["timing_cache"]["reused"] is False
    manifest = read_engine_manifest(out)
    assert manifest["device"]["compute_capability"] == entry["device"]["compute_capability"]
    assert manifest["plans"]["student.plan"]["sha256"] == entry["sha256"]

    sha = cache.read_bytes()
    again = build_engine(out / "student.onnx", out / "student.plan", precision="int8", timing_cache=cache, workspace_mb=512)
    assert again["timing_cache"]["reused"] is True and cache.read_bytes() == sha  # pinned: never rewritten

    spec = art.policy.spec
    inputs = sample_inputs(spec, tiny_episode_set, 6, seed=5)
    ort = OrtRunner(art.onnx_path, spec).run_batched(inputs)
    rel = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))
    assert rel(TrtRunner(out / "student.plan", spec).run(inputs), ort) < 0.05
    assert rel(TrtSplitRunner(out, spec).run(inputs), SplitRunner(out, spec).run(inputs)) < 0.05

    manifest["device"]["compute_capability"] = "1.0"
    (out / ENGINE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="compute capability 1.0"):
        load_plan(out / "student.plan")


def test_build_engine_then_verify_on_device_replaces_the_estimate(gpu, tmp_path, tiny_checkpoint, tiny_episodes):
    """The whole device flow: build for an x86-gpu profile of THIS GPU (exit 3: estimated), build the
    plans, then `vlacompile verify --runtime tensorrt` measures and the budget is no longer estimated."""
    import torch

    from vlacompile.cli import main
    from vlacompile.resources import TARGETS_DIR

    props = torch.cuda.get_device_properties(0)
    target = tmp_path / "this-gpu.toml"
    target.write_text(
        (TARGETS_DIR / "x86-gpu.toml").read_text()
        .replace('compute_capability = "8.9"', f'compute_capability = "{props.major}.{props.minor}"')
        .replace("actions_per_chunk = 8", "actions_per_chunk = 4")
        .replace("max_nmse = 0.05", "max_nmse = 10.0").replace("min_cosine = 0.95", "min_cosine = -1.0")
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stages]]\nstage = "distill"\nflow_steps = 1\nsteps = 20\nnum_samples = 32\n'
                      '[[stages]]\nstage = "quantize"\nprecision = "int8"\ncalibration_samples = 8\n'
                      '[[stages]]\nstage = "export"\n')
    out = tmp_path / "out"
    cli = CliRunner()
    built = cli.invoke(main, ["build", "-q", "--calls", "20", "--target", str(target), "--checkpoint", str(tiny_checkpoint),
                              "--episodes", str(tiny_episodes), "--recipe", str(recipe), "--out", str(out)])
    assert built.exit_code == 3, built.output
    assert cli.invoke(main, ["engine", str(out)]).exit_code == 0
    verified = cli.invoke(main, ["verify", str(out), "--runtime", "tensorrt", "--calls", "20", "-q"])
    report = json.loads((out / "report.json").read_text())
    assert report["verified_with"]["on_target"] is True, verified.output
    assert report["latency"]["student"]["kind"] == "measured" and report["latency"]["student"]["measured_on"]
    assert report["status"] in ("passed", "failed") and verified.exit_code in (0, 1)
    assert all(g["status"] != "not_verified" for g in report["gates"]["gates"])
