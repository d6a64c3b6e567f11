"""End-to-end: `vlacompile build` on a tiny teacher, its exit codes, and what bad input leaves behind."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlacompile.cli import main
from vlacompile.errors import EXIT_GATE_FAILED, EXIT_INPUT_ERROR, EXIT_OK, EXIT_UNVERIFIED
from vlacompile.resources import TARGETS_DIR

TINY_RECIPE = """
name = "tiny"
seed = 0
[[stages]]
stage = "distill"
layers = { vision = [0], backbone = [1], expert = [0, 1] }
flow_steps = 1
steps = 60
batch_size = 16
num_samples = 128
[[stages]]
stage = "export"
[[stages]]
stage = "quantize"
precision = "int8"

[closed_loop]
suite = "reaching"
episodes_per_task = 1
max_success_drop = 1.0   # the tiny teacher is untrained: this checks the plumbing, not the policy
"""

# A GPU-target recipe: modelopt Q/DQ INT8 before export, as TensorRT wants it.
TINY_GPU_RECIPE = """
name = "tiny-gpu"
[[stages]]
stage = "distill"
layers = { expert = [0] }
flow_steps = 2
steps = 30
batch_size = 16
num_samples = 64
[[stages]]
stage = "quantize"
precision = "int8"
calibration_samples = 16
[[stages]]
stage = "export"
"""


def _target(tmp_path: Path, name: str, *, max_nmse: float, p99_ms: float = 1000.0) -> Path:
    """x86-cpu with other tolerances, so a test can choose whether the accuracy gate passes."""
    text = (TARGETS_DIR / "x86-cpu.toml").read_text()
    text = text.replace("max_nmse = 0.05", f"max_nmse = {max_nmse}").replace("min_cosine = 0.95", "min_cosine = -1.0")
    text = text.replace("p99_latency_ms = 10", f"p99_latency_ms = {p99_ms}").replace('name = "x86-cpu"', f'name = "{name}"')
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _thor_target(tmp_path: Path) -> Path:
    """Thor's profile with chunks the tiny policy can supply (it emits 8 actions, Thor executes 16)."""
    thor = tmp_path / "jetson-thor.toml"
    thor.write_text((TARGETS_DIR / "jetson-thor.toml").read_text().replace("actions_per_chunk = 16", "actions_per_chunk = 8"))
    return thor


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(args: list[str]):
    result = CliRunner().invoke(main, ["build", "--quiet", "--calls", "20", *args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint_module, tiny_episodes_module):
    """One passing x86-cpu build shared by the tests below."""
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    target = _target(tmp, "loose-cpu", max_nmse=10.0)
    out = tmp / "out"
    result = _build(["--target", str(target), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module), "--recipe", str(recipe), "--out", str(out)])
    return {"tmp": tmp, "recipe": recipe, "target": target, "out": out, "result": result}


def test_build_passes_and_reports(built):
    result, out = built["result"], built["out"]
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads((out / "report.json").read_text())
    # The stable subset CI scripts read.
    assert report["schema_version"] and report["target"] == "loose-cpu" and report["passed"] is True
    lat = report["latency"]
    assert lat["teacher"]["p50_ms"] > 0 and lat["student"]["p50_ms"] > 0
    assert lat["student"]["p99_ms"] >= lat["student"]["p50_ms"]
    assert isinstance(lat["student"]["measured_on"], str) and lat["student"]["measured_on"]
    assert 0 <= report["accuracy"]["nmse_vs_teacher"] < 10.0
    # Every listed file exists with the recorded hash; the ONNX graph and the manifest are among them.
    files = {f["path"]: f["sha256"] for f in report["artifact"]["files"]}
    assert any(p.endswith(".onnx") for p in files) and "manifest.json" in files
    for path, digest in files.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest, path
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    # The stages ran as the recipe said: 1 flow step, INT8.
    assert report["student"]["flow_steps"] == 1 and report["student"]["precision"] == "int8"
    assert [s["stage"] for s in report["stages"]] == ["distill", "export", "quantize"]
    # Closed loop: teacher and student ran the reaching suite on the same seeds.
    cl = report["closed_loop"]
    assert cl["episodes"] == len(cl["teacher"]["tasks"]) == 9
    for who in ("teacher", "student"):
        assert 0.0 <= cl[who]["success_rate"] <= 1.0
    gate = next(g for g in report["gates"]["gates"] if g["name"] == "closed_loop_success_drop")
    lo, hi = gate["interval"]
    assert lo <= gate["value"] <= hi and gate["confidence"] == 0.95 and "exact McNemar" in gate["note"]
    assert cl["comparison"]["paired"]["episodes"] == 9
    assert "Closed loop" in (out / "report.md").read_text() and "95% interval" in (out / "report.md").read_text()
    # No partial or lock debris beside the output.
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_the_build_runs_in_the_runtime(built, tiny_episode_set):
    """What the build wrote loads in vlacompile_runtime (format version, hashes, the quantised graph
    manifest.json names) and gives the compiler's ONNX Runtime chunks on held-out observations."""
    import numpy as np
    import vlacompile_runtime

    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.observation import from_lerobot

    out = built["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == vlacompile_runtime.FORMAT_VERSION
    assert {manifest["onnx"], "student_spec.json"} <= set(manifest["runtime_files"]) and manifest["onnx"] == "student.int8.onnx"
    policy = vlacompile_runtime.load(out, threads=1)
    runner = OrtRunner(out / manifest["onnx"], policy.spec, threads=1)
    from vlacompile.data.episodes import split_episodes
    from vlacompile.data.sampling import make_samples

    held_out = make_samples(split_episodes(tiny_episode_set)[2], chunk_size=policy.spec.chunk_size, stride=9)
    rng = np.random.default_rng(0)
    for i in range(3):
        obs = {"observation.images.front": held_out.images["front"][i], "observation.state": held_out.state[i], "task": held_out.tasks[i]}
        noise = rng.standard_normal(policy.spec.noise_shape, dtype=np.float32)
        np.testing.assert_allclose(policy.predict_chunk(obs, noise), runner.get_action(from_lerobot(obs, policy.spec), noise), rtol=0, atol=1e-5)
    assert policy.select_action(obs).shape == (policy.spec.action_dim,)


def test_report_command_prints_summary(built):
    result = CliRunner().invoke(main, ["report", str(built["out"])])
    assert result.exit_code == EXIT_OK
    assert "loose-cpu" in result.output


def test_failed_gate_exits_1_and_still_writes_report(built, tiny_checkpoint_module, tiny_episodes_module):
    tmp = built["tmp"]
    strict = _target(tmp, "strict-cpu", max_nmse=1e-9)
    out = tmp / "strict-out"
    result = _build(["--target", str(strict), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module),
                     "--recipe", str(built["recipe"]), "--out", str(out), "--no-closed-loop"])
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["status"] == "failed"
    # --no-closed-loop: the recipe's simulator evaluation was skipped, and nothing claims it ran.
    assert "closed_loop" not in report and "skipped (--no-closed-loop)" in result.output
    assert not any(g["name"] == "closed_loop_success_drop" for g in report["gates"]["gates"])
    failed = [g for g in report["gates"]["gates"] if g["status"] == "fail"]
    assert any("nmse" in g["name"].lower() for g in failed)


@pytest.mark.parametrize(
    "case",
    ["fp8_on_cpu", "missing_checkpoint", "truncated_weights", "missing_column", "unknown_target", "unknown_stage", "suite_misfit"],
)
def test_bad_input_fails_fast_and_leaves_output_untouched(case, built, tiny_checkpoint_module, tiny_episodes_module):
    tmp, out = built["tmp"], built["out"]
    before = _hashes(out)
    ckpt, eps, recipe, target = tiny_checkpoint_module, tiny_episodes_module, built["recipe"], str(built["target"])
    expect = None
    if case == "fp8_on_cpu":
        recipe = tmp / "fp8.toml"
        recipe.write_text(TINY_RECIPE.replace('precision = "int8"', 'precision = "fp8"'))
        expect = ["fp8", "loose-cpu"]
    elif case == "missing_checkpoint":
        ckpt = tmp / "no-such-checkpoint"
        expect = ["no-such-checkpoint"]
    elif case == "truncated_weights":
        ckpt = tmp / "truncated"
        shutil.copytree(tiny_checkpoint_module, ckpt, dirs_exist_ok=True)
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        expect = ["model.safetensors", "truncated"]
    elif case == "missing_column":
        import pyarrow.parquet as pq

        eps = tmp / "no-action"
        shutil.copytree(tiny_episodes_module, eps, dirs_exist_ok=True)
        data_file = next((eps / "data").rglob("*.parquet"))
        table = pq.read_table(data_file)
        pq.write_table(table.drop(["action"]), data_file)
        expect = ["action", data_file.name]
    elif case == "unknown_target":
        target = "jetson-nope"
        expect = ["jetson-nope", "x86-cpu"]
    elif case == "unknown_stage":
        recipe = tmp / "unknown-stage.toml"
        recipe.write_text(TINY_RECIPE.replace('stage = "export"', 'stage = "exprot"'))
        expect = ["exprot", "export"]
    elif case == "suite_misfit":  # a closed-loop task the suite does not have: refused before any work
        recipe = tmp / "misfit.toml"
        recipe.write_text(TINY_RECIPE.replace('suite = "reaching"', 'suite = "reaching"\ntasks = ["open the pod bay doors"]'))
        expect = ["[closed_loop]", "open the pod bay doors", "--no-closed-loop"]
    result = _build(["--target", target, "--checkpoint", str(ckpt), "--episodes", str(eps), "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    for word in expect:
        assert word in result.output, (word, result.output)
    assert "Hint:" in result.output
    assert _hashes(out) == before


def test_jetson_thor_build_is_unverified_but_produces_onnx(tmp_path, tiny_checkpoint_module, tiny_episodes_module):
    recipe = tmp_path / "tiny-gpu.toml"
    recipe.write_text(TINY_GPU_RECIPE)
    thor = _thor_target(tmp_path)
    out = tmp_path / "thor"
    result = _build(["--target", str(thor), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module), "--recipe", str(recipe), "--out", str(out)])
    assert (out / "report.json").is_file(), result.output
    report = json.loads((out / "report.json").read_text())
    if report["status"] == "failed":  # only accuracy can fail here: latency is never judged on an estimate
        assert all(g["status"] != "fail" or "latency" not in g["name"] for g in report["gates"]["gates"])
        pytest.fail(f"tiny GPU recipe failed its accuracy gate: {report['gates']}")
    assert result.exit_code == EXIT_UNVERIFIED, result.output
    assert report["status"] == "unverified" and report["passed"] is False
    assert report["latency"]["student"]["measured_on"] is None
    assert report["latency"]["student"]["kind"] == "estimated"
    assert "estimated" in result.output.lower() and "not verified" in result.output.lower()
    assert any(p.suffix == ".onnx" for p in out.iterdir())
    # The modelopt INT8 graph passes the static TensorRT-readiness check.
    readiness = next(g for g in report["gates"]["gates"] if g["name"] == "tensorrt_readiness")
    assert readiness["status"] == "pass", readiness
    statuses = {g["status"] for g in report["gates"]["gates"] if "latency" in g["name"] or "deadline" in g["name"]}
    assert statuses and "pass" not in statuses


def test_jetson_thor_fp8_split_build(tmp_path, tiny_checkpoint_module, tiny_episodes_module):
    """FP8 Q/DQ (modelopt) exports TensorRT-only ops that ONNX Runtime cannot run: the build still
    verifies accuracy (on the fake-quant torch student, and says so), writes the split graphs, and
    passes the readiness check for Thor's TensorRT."""
    recipe = tmp_path / "fp8.toml"
    recipe.write_text(
        TINY_GPU_RECIPE.replace('precision = "int8"', 'precision = "fp8"').replace('stage = "export"', 'stage = "export"\nsplit = true')
    )
    thor = _thor_target(tmp_path)
    out = tmp_path / "thor-fp8"
    result = _build(["--target", str(thor), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module), "--recipe", str(recipe), "--out", str(out)])
    assert (out / "report.json").is_file(), result.output
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["precision"] == "fp8"
    assert {"student.onnx", "system2.onnx", "system1.onnx", "split.json"} <= {p.name for p in out.iterdir()}
    assert any("TensorRT-only ops" in n and "fake-quant" in n for n in report["notes"])
    assert report["accuracy"]["nmse_vs_teacher"] >= 0
    readiness = next(g for g in report["gates"]["gates"] if g["name"] == "tensorrt_readiness")
    assert readiness["status"] == "pass", readiness
    assert set(report["tensorrt_readiness"]) == {"student.onnx", "system2.onnx", "system1.onnx"}


def test_verify_again_reproduces_accuracy_and_keeps_artifact_files(built):
    out = built["out"]
    before = json.loads((out / "report.json").read_text())
    files_before = {f["path"]: f["sha256"] for f in before["artifact"]["files"]}
    result = CliRunner().invoke(main, ["verify", str(out), "--runtime", "ort-cpu", "--calls", "20", "--quiet"])
    assert result.exit_code == EXIT_OK, result.output
    after = json.loads((out / "report.json").read_text())
    assert after["verified_with"] == {"runtime": "ort-cpu", "device": None, "on_target": False}
    # Same held-out samples, same noise, same graph: the same accuracy, to the bit.
    assert after["accuracy"]["nmse_vs_teacher"] == before["accuracy"]["nmse_vs_teacher"]
    for path, digest in files_before.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest, path


def test_verify_refuses_a_different_teacher(built, tmp_path, tiny_policy):
    import torch

    from vlacompile.checkpoint import save_policy

    with torch.no_grad():
        next(tiny_policy.module.parameters()).add_(1.0)
    other = save_policy(tiny_policy, tmp_path / "other-teacher")
    result = CliRunner().invoke(main, ["verify", str(built["out"]), "--checkpoint", str(other), "--quiet"])
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "not the teacher this artifact was built from" in result.output and "Hint:" in result.output


@pytest.mark.parametrize("runtime, words", [("ort-cuda", ["CUDAExecutionProvider"]), ("tensorrt", ["vlacompile[gpu]"])])
def test_verify_on_gpu_runtimes_says_what_is_missing_here(built, runtime, words):
    result = CliRunner().invoke(main, ["verify", str(built["out"]), "--runtime", runtime, "--quiet"])
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def test_verify_on_the_cpu_of_an_fp8_artifact_explains_instead_of_crashing(tmp_path, tiny_checkpoint_module, tiny_episodes_module):
    recipe = tmp_path / "fp8.toml"
    recipe.write_text(TINY_GPU_RECIPE.replace('precision = "int8"', 'precision = "fp8"'))
    out = tmp_path / "thor-fp8"
    _build(["--target", str(_thor_target(tmp_path)), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module), "--recipe", str(recipe), "--out", str(out)])
    result = CliRunner().invoke(main, ["verify", str(out), "--runtime", "ort-cpu", "--quiet"])
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Traceback" not in result.output and "ONNX Runtime cannot run" in result.output and "Hint:" in result.output


def test_baseline_passes_a_rebuild_and_fails_a_regression_and_diff_marks_it(built, tiny_checkpoint_module, tiny_episodes_module):
    """A rebuild with nothing changed passes --baseline; an untrained student (distill steps = 0) is a
    regression beyond noise: exit 1, naming the metric. `report diff` marks the same; --junit is JUnit."""
    import xml.etree.ElementTree as ET

    tmp, out = built["tmp"], built["out"]
    common = ["--target", str(built["target"]), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module),
              "--no-closed-loop"]
    same = _build([*common, "--recipe", str(built["recipe"]), "--out", str(tmp / "again"), "--baseline", str(out),
                   "--junit", str(tmp / "again.xml")])
    assert same.exit_code == EXIT_OK, same.output
    assert "no regression beyond noise" in same.output
    report = json.loads((tmp / "again" / "report.json").read_text())
    assert {"baseline:accuracy.nmse_vs_teacher", "baseline:latency.student_over_teacher_p50"} <= set(report["baseline"]["gates"])
    suites = ET.parse(tmp / "again.xml").getroot()
    cases = suites.findall("testsuite/testcase")
    assert suites.tag == "testsuites" and int(suites.get("tests")) == len(cases) == len(report["gates"]["gates"])
    assert int(suites.get("failures")) == 0 and {c.get("name") for c in cases} >= {"nmse_vs_teacher", "p99_latency_ms"}

    (tmp / "untrained.toml").write_text(built["recipe"].read_text().replace("steps = 60", "steps = 0"))
    worse = _build([*common, "--recipe", str(tmp / "untrained.toml"), "--out", str(tmp / "worse"), "--baseline", str(out),
                    "--junit", str(tmp / "worse.xml")])
    assert worse.exit_code == EXIT_GATE_FAILED, worse.output
    assert "baseline:accuracy.nmse_vs_teacher" in worse.output and "a regression beyond noise" in worse.output
    failed = [c.get("name") for c in ET.parse(tmp / "worse.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert "baseline:accuracy.nmse_vs_teacher" in failed

    diff = CliRunner().invoke(main, ["report", "diff", str(out), str(tmp / "worse"), "--out", str(tmp / "diff.md")])
    assert diff.exit_code == 1
    assert "`accuracy.nmse_vs_teacher`" in diff.output and "**beyond noise**" in diff.output
    data = json.loads((tmp / "diff.md.json").read_text())
    row = next(r for r in data["metrics"] if r["metric"] == "accuracy.nmse_vs_teacher")
    assert row["status"] == "beyond noise" and row["direction"] == "worse" and "recipe" in data["inputs"]
    nochange = CliRunner().invoke(main, ["report", "diff", str(out), str(tmp / "again")])
    assert nochange.exit_code == 0, nochange.output


def test_a_rebuild_reuses_the_closed_loop_rollouts(built, tiny_checkpoint_module, tiny_episodes_module):
    """Same teacher, same student graph, same suite and seeds: the rollouts come from the cache, the
    latency is measured again; a different episode count runs them again."""
    tmp = built["tmp"]
    args = ["--target", str(built["target"]), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module)]
    again = _build([*args, "--recipe", str(built["recipe"]), "--out", str(tmp / "cl-again")])
    assert again.exit_code == EXIT_OK, again.output
    old = json.loads((built["out"] / "report.json").read_text())["closed_loop"]
    new = json.loads((tmp / "cl-again" / "report.json").read_text())
    assert new["closed_loop"]["reused"] is True and "rollouts of the teacher and student reused" in again.output
    assert new["closed_loop"]["student"]["success_rate"] == old["student"]["success_rate"]
    assert any("closed-loop rollouts were reused" in n for n in new["notes"])
    (tmp / "more.toml").write_text(built["recipe"].read_text().replace("episodes_per_task = 1", "episodes_per_task = 2"))
    more = _build([*args, "--recipe", str(tmp / "more.toml"), "--out", str(tmp / "cl-more")])
    report = json.loads((tmp / "cl-more" / "report.json").read_text())
    assert report["closed_loop"]["reused"] is False and report["closed_loop"]["episodes"] == 18, more.output
    assert report["closed_loop"]["reused_runs"] == []
    # Another student (no training): only its rollouts run; the teacher's are the first build's.
    (tmp / "other.toml").write_text(built["recipe"].read_text().replace("steps = 60", "steps = 0"))
    other = _build([*args, "--recipe", str(tmp / "other.toml"), "--out", str(tmp / "cl-other")])
    report = json.loads((tmp / "cl-other" / "report.json").read_text())
    assert report["closed_loop"]["reused_runs"] == ["teacher"] and "rollouts of the teacher reused" in other.output, other.output
    assert report["closed_loop"]["teacher"]["success_rate"] == old["teacher"]["success_rate"]
    assert any("teacher's closed-loop rollouts were reused" in n for n in report["notes"])
