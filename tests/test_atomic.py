"""Killed and concurrent builds: the previous output survives byte for byte, no half cache entry is
ever read, a re-run resumes from the stages that finished, and unwritable outputs fail fast (exit 2).

Builds run in subprocesses killed with SIGKILL at points named by the test hook
``VLACOMPILE_TEST_PAUSE_AT`` (``vlacompile.cache.test_pause``).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_build_e2e import TINY_RECIPE

from vlacompile.cache import StageCache
from vlacompile.cli import main
from vlacompile.errors import EXIT_INPUT_ERROR

# The end-to-end tests' tiny recipe, with fewer distillation steps and no closed loop.
RECIPE = TINY_RECIPE.split("[closed_loop]")[0].replace("steps = 60", "steps = 30").replace("num_samples = 128", "num_samples = 64")
assert "steps = 30" in RECIPE and "num_samples = 64" in RECIPE

# The code hash is pinned: another engineer saving a file between two builds must not change keys.
SCRIPT = """
import sys, torch, vlacompile, vlacompile.cache
torch.set_num_threads(1)
vlacompile.cache.code_hash = lambda: "pinned"
ckpt, eps, recipe, out, cache = sys.argv[1:6]
r = vlacompile.build("x86-cpu", checkpoint=ckpt, episodes=eps, recipe=recipe, out=out, cache_dir=cache, calls=20, progress=False)
print("RESULT", r.status, flush=True)
"""


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint_module, tiny_episodes_module):
    """A good output from a finished build, which every killed build below must leave untouched."""
    tmp = tmp_path_factory.mktemp("atomic")
    recipe = tmp / "tiny.toml"
    recipe.write_text(RECIPE)
    s = {"tmp": tmp, "ckpt": tiny_checkpoint_module, "eps": tiny_episodes_module, "recipe": recipe, "out": tmp / "good"}
    done = _start(s, tmp / "cache-good")
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0 and "RESULT" in out, out
    s["good"] = _hashes(s["out"])
    return s


def _start(s: dict, cache: Path, pause: str | None = None, out: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VLACOMPILE_TEST_PAUSE_AT"}
    if pause:
        env["VLACOMPILE_TEST_PAUSE_AT"] = pause
    args = [str(s["ckpt"]), str(s["eps"]), str(s["recipe"]), str(out or s["out"]), str(cache)]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_paused(proc: subprocess.Popen, point: str, timeout: float = 240) -> list[str]:
    """Read the build's log until it pauses at ``point``; the lines so far."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.strip() == f"PAUSED {point}":
            return lines
    proc.kill()
    pytest.fail(f"build never paused at {point}:\n" + "\n".join(lines[-30:]))


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def _keys(report: dict) -> list[str]:
    return [k["key"] for k in report["cache"]["keys"]]


def test_killed_builds_leave_output_and_cache_consistent_and_resume(setup):
    tmp, out = setup["tmp"], setup["out"]
    cache_dir = tmp / "cache-kill"
    cache = StageCache(cache_dir)
    keys = _keys(json.loads((out / "report.json").read_text()))

    # 1. Killed while writing distill's cache entry: the half entry is never readable.
    proc = _start(setup, cache_dir, pause="cache-write:distill")
    _wait_paused(proc, "cache-write:distill")
    assert list(cache_dir.glob(".tmp-*/policy/model.safetensors"))  # the half-written entry exists ...
    _kill(proc)
    # ... but is no entry (the teacher's targets, computed before training, are a complete entry of their own)
    assert not cache.has(keys[0]) and [e.stage for e in cache.entries()] in ([], ["teacher-targets"])
    assert _hashes(out) == setup["good"]
    assert list(tmp.glob(".good.partial-*"))  # SIGKILL leaves the partial directory behind

    # 2. Killed before export: distill finished, so its entry is complete.
    proc = _start(setup, cache_dir, pause="stage:export")
    _wait_paused(proc, "stage:export")
    _kill(proc)
    assert cache.has(keys[0]) and not cache.has(keys[1])
    assert _hashes(out) == setup["good"]

    # 3. Killed while the reports are written: the re-run resumed after distill.
    proc = _start(setup, cache_dir, pause="report")
    lines = _wait_paused(proc, "report")
    partial = [p for p in tmp.glob(".good.partial-*") if (p / "report.json").is_file()]
    assert len(partial) == 1, partial
    report = json.loads((partial[0] / "report.json").read_text())
    _kill(proc)
    assert [s["reused"] for s in report["stages"]] == [True, False, False]
    assert any("cache: reusing distill " in line for line in lines)
    assert _hashes(out) == setup["good"]
    assert all(cache.has(k) for k in keys)

    # 4. A run to the end reuses every stage, replaces the output and clears the debris.
    proc = _start(setup, cache_dir)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "RESULT" in log, log
    report = json.loads((out / "report.json").read_text())
    assert [s["reused"] for s in report["stages"]] == [True, True, True]
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    new = _hashes(out)
    for name in ("student.onnx", "student.int8.onnx", "student/model.safetensors"):
        assert new[name] == setup["good"][name], name


def test_interrupted_swap_restores_previous_output(setup, tmp_path):
    """Killed between moving the old output aside and the new one in: the next build puts it back."""
    from vlacompile.pipeline import output_lock, recover_output

    out = tmp_path / "art"
    out.mkdir()
    (out / "report.json").write_text("{}")
    os.rename(out, tmp_path / ".art.old-12345")
    (tmp_path / ".art.partial-12345").mkdir()
    with output_lock(out):
        recover_output(out, log=lambda m: None)
    assert (out / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock", "art"]


def test_second_build_into_same_output_refuses(setup):
    tmp = setup["tmp"]
    out = tmp / "locked"
    first = _start(setup, tmp / "cache-lock", pause="stage:distill", out=out)
    try:
        _wait_paused(first, "stage:distill")
        second = subprocess.run(
            [sys.executable, "-m", "vlacompile.cli", "build", "--quiet", "--checkpoint", str(setup["ckpt"]),
             "--episodes", str(setup["eps"]), "--recipe", str(setup["recipe"]), "--out", str(out),
             "--cache-dir", str(tmp / "cache-lock")],
            capture_output=True, text=True, timeout=240, check=False,
        )
    finally:
        _kill(first)
    assert second.returncode == EXIT_INPUT_ERROR, second.stderr
    assert "another vlacompile build is writing this output directory" in second.stderr
    assert str(out) in second.stderr and "Traceback" not in second.stderr
    assert not out.exists()


def _cli_build(out: Path, setup: dict):
    return CliRunner().invoke(
        main,
        ["build", "--quiet", "--checkpoint", str(setup["ckpt"]), "--episodes", str(setup["eps"]),
         "--recipe", str(setup["recipe"]), "--out", str(out), "--no-cache"],
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod 0o500; the cases below fail for root too")
def test_read_only_output_parent_exits_2(setup, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        result = _cli_build(ro / "out", setup)
    finally:
        ro.chmod(0o700)
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "not writable" in result.output and str(ro) in result.output and "Hint:" in result.output


@pytest.mark.parametrize("case", ["file_in_the_way", "parent_is_a_file", "proc"])
def test_unwritable_output_exits_2(case, setup, tmp_path):
    if case == "file_in_the_way":
        out = tmp_path / "a-file"
        out.write_text("not a directory")
        expect = "exists and is not a directory"
    elif case == "parent_is_a_file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
        expect = "cannot create the output's parent directory"
    else:
        out = Path("/proc/vlacompile-test/out")  # /proc refuses new directories, for root too
        expect = "cannot create the output's parent directory"
    result = _cli_build(out, setup)
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert expect in result.output and "Hint:" in result.output and "Traceback" not in result.output
    if case == "file_in_the_way":
        assert out.read_text() == "not a directory"
