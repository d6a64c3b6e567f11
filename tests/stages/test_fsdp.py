"""Distillation sharded with FSDP2 over 2 gloo processes matches the single-process run; the
`vlacompile distill` command fills the stage cache a later build reuses; the teacher's targets are
computed once and reused by a build with another student."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vlacompile.cli import main
from vlacompile.resources import TARGETS_DIR

HERE = Path(__file__).parent
FX = HERE.parent / "families" / "pi0" / "fixtures" / "pi0_two_cams"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_fsdp_matches_one_process_on_a_tiny_pi0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    worker = [sys.executable, str(HERE / "fsdp_worker.py")]
    steps, port = "20", str(_free_port())
    (tmp_path / "single").mkdir()
    (tmp_path / "fsdp").mkdir()
    procs = [subprocess.Popen([*worker, str(tmp_path / "single"), steps], env=env, stderr=subprocess.PIPE, text=True)]
    for rank in range(2):
        dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([*worker, str(tmp_path / "fsdp"), steps], env={**env, **dist}, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    from safetensors.torch import load_file

    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    sharded = json.loads((tmp_path / "fsdp" / "rank0.json").read_text())
    assert single["processes"] == 1 and single["parallel"] == "none"
    assert sharded["processes"] == 2 and sharded["parallel"] == "fsdp"
    # Each process held half the student while training (the shards of every layer and of the root).
    assert sharded["local_parameters"] * 2 == pytest.approx(single["local_parameters"], rel=0.01)
    one = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    r0 = load_file(str(tmp_path / "fsdp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "fsdp" / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # both processes end with the same full student
    action_diff = (one.pop("__actions__") - r0.pop("__actions__")).abs().max().item()
    weight_diff = max((one[k] - r0[k]).abs().max().item() for k in one)
    print(f"FSDP 2 processes vs 1 after {steps} steps: max |action diff| {action_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert action_diff < 1e-4 and weight_diff < 1e-3


RECIPE = """
name = "tiny-pi0"
[[stages]]
stage = "distill"
layers = {{ vision = 0.5, backbone = {backbone} }}
flow_steps = 2
steps = 10
batch_size = 8
num_samples = 32
parallel = "fsdp"
[[stages]]
stage = "export"
"""


def test_distill_fills_the_cache_a_build_reuses_and_targets_are_computed_once(tmp_path):
    target = tmp_path / "x86.toml"
    target.write_text((TARGETS_DIR / "x86-cpu.toml").read_text().replace("actions_per_chunk = 8", "actions_per_chunk = 4"))
    common = ["--target", str(target), "-c", str(FX / "policy"), "--tokenizer", str(FX / "tokenizer"), "-e", str(FX / "episodes"),
              "--cache-dir", str(tmp_path / "cache"), "-q"]
    (tmp_path / "a.toml").write_text(RECIPE.format(backbone=0.67))
    result = CliRunner().invoke(main, ["distill", *common, "-r", str(tmp_path / "a.toml")])
    assert result.exit_code == 0, result.output
    assert "cached under" in result.output and not (tmp_path / "build").exists()
    result = CliRunner().invoke(main, ["build", *common, "-r", str(tmp_path / "a.toml"), "--out", str(tmp_path / "a"), "--calls", "20"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["stages"][0]["reused"] is True, result.output
    # Another student (one backbone layer) from the same teacher and samples: the targets are reused.
    (tmp_path / "b.toml").write_text(RECIPE.format(backbone=0.34))
    result = CliRunner().invoke(main, ["build", *common, "-r", str(tmp_path / "b.toml"), "--out", str(tmp_path / "b"), "--calls", "20"])
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["stages"][0]["reused"] is False and report["stages"][0]["targets_reused"] is True, result.output
