"""Importing vlacompile and running its light commands loads no heavy dependency.

Each check runs in a fresh interpreter: this test process has torch loaded already.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "modelopt", "accelerate", "onnx", "polygraphy", "matplotlib")
SHIPPED = ("jetson-orin", "jetson-orin-nano", "jetson-thor", "x86-cpu", "x86-gpu")

# Runs in a child: does the work, then prints which heavy top-level packages got imported.
PROBE = """
import json, sys
HEAVY = {heavy!r}
{body}
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))
print("LOADED=" + json.dumps(loaded))
"""


def _probe(body: str) -> tuple[list[str], str]:
    code = PROBE.format(heavy=HEAVY, body=body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED="), proc.stdout
    return json.loads(last[len("LOADED="):]), proc.stdout


def test_import_is_lean():
    loaded, _ = _probe("import vlacompile, vlacompile.cli, vlacompile.targets, vlacompile.errors, vlacompile.config_util")
    assert loaded == [], f"importing vlacompile pulled in {loaded}"


def test_loading_targets_is_lean():
    loaded, out = _probe(
        "import vlacompile\n"
        "from vlacompile.targets import list_targets, load_target\n"
        "print(sorted(t.name for t in map(load_target, list_targets())))\n"
        "print(vlacompile.load_target('x86-cpu').name)"  # the lazy top-level attribute
    )
    assert loaded == []
    for name in SHIPPED:
        assert name in out


def test_cli_help_and_targets_are_lean():
    loaded, out = _probe(
        "from click.testing import CliRunner\n"
        "from vlacompile.cli import main\n"
        "for args in (['--help'], ['targets'], ['targets', '--json'], ['build', '--help']):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code == 0, (args, r.output, r.exception)\n"
        "    print(r.output)"
    )
    assert loaded == [], f"`vlacompile --help` / `targets` pulled in {loaded}"
    for name in SHIPPED:
        assert name in out


def test_lazy_attribute_loads_torch_only_when_asked():
    loaded, _ = _probe("import vlacompile\nvlacompile.load_policy")
    assert "torch" in loaded  # the probe does see heavy imports


@pytest.mark.parametrize("args", [["--help"], ["targets"], ["--version"]])
def test_cli_entry_point_runs(args):
    proc = subprocess.run(
        [sys.executable, "-m", "vlacompile.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if args == ["targets"]:
        lines = proc.stdout.splitlines()
        for name in SHIPPED:
            assert any(line.startswith(name + " ") for line in lines), (name, proc.stdout)
    elif args == ["--help"]:
        for word in ("build", "targets", "report", "Exit codes"):
            assert word in proc.stdout
    else:
        assert "0.1.0" in proc.stdout


def test_targets_json_lists_every_target():
    from click.testing import CliRunner

    from vlacompile.cli import main

    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {t["name"] for t in data} >= set(SHIPPED)
    assert all(t["budget"]["p99_latency_ms"] > 0 for t in data)


def test_the_runtime_imports_neither_torch_nor_the_compiler():
    """vlacompile_runtime runs on a robot without torch; it never imports the compiler."""
    body = ("import vlacompile_runtime, vlacompile_runtime.policy, vlacompile_runtime.processors, vlacompile_runtime.split, "
            "vlacompile_runtime.onnxrt, vlacompile_runtime.tokenizer\n"
            "vlacompile_runtime.load\n"
            "print('COMPILER=' + json.dumps(sorted(m for m in sys.modules if m == 'vlacompile' or m.startswith('vlacompile.'))))")
    loaded, out = _probe(body)
    assert loaded == [], f"importing vlacompile_runtime pulled in {loaded}"
    compiler = json.loads(next(line for line in out.splitlines() if line.startswith("COMPILER="))[len("COMPILER="):])
    assert compiler == [], f"the runtime imported the compiler: {compiler}"


def test_runtime_sources_never_name_the_compiler():
    """Layers import downward only: no module of the runtime imports vlacompile (even lazily)."""
    import re
    from pathlib import Path

    import vlacompile_runtime

    root = Path(vlacompile_runtime.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+vlacompile(\.|\s|$)", re.M)
    offenders = [p.name for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
