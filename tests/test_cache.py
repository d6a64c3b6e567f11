"""The stage cache: keys, atomic entries, reuse in builds, reproducible artifacts from a clean cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlacompile.cache import ENTRY_META, StageCache, episodes_hash, root_key, stage_keys
from vlacompile.cli import main
from vlacompile.recipes import parse_recipe
from vlacompile.stages import Artifact
from vlacompile.targets import load_target

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_RECIPE = {
    "name": "tiny-cache",
    "seed": 0,
    "stages": [
        {"stage": "distill", "layers": {"vision": [0], "backbone": [1], "expert": [0, 1]}, "flow_steps": 1, "steps": 40, "batch_size": 16, "num_samples": 64},
        {"stage": "export"},
        {"stage": "quantize", "precision": "int8"},
    ],
}
VERSIONS = {"torch": "t", "vlacompile-code": "c"}


@pytest.fixture(autouse=True)
def pinned_code_hash(monkeypatch):
    # Other engineers edit this tree while the suite runs; a saved file between two builds of a test
    # would change every key. That the code is in the key is tested below.
    monkeypatch.setattr("vlacompile.cache.code_hash", lambda: "pinned")


def _recipe(**stage_overrides) -> object:
    data = json.loads(json.dumps(TINY_RECIPE))
    for i, override in stage_overrides.items():
        data["stages"][int(i[1:])].update(override)
    return parse_recipe(data, "test-recipe")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _artifact_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): _sha(p) for p in sorted(out.rglob("*")) if p.suffix in (".onnx", ".data", ".safetensors")}


# --- keys ------------------------------------------------------------------------------------


def test_keys_chain_and_change_from_the_changed_stage_on(tmp_path):
    target = load_target("x86-cpu")
    root = root_key("w" * 64, b"{}", "e" * 64, 0)
    base = stage_keys(root, _recipe().stages, target, VERSIONS)
    assert len(set(base)) == 3 and all(len(k) == 64 for k in base)
    assert stage_keys(root, _recipe().stages, target, VERSIONS) == base  # deterministic
    # One export parameter: distill's key stays, export's and everything after it change.
    changed = stage_keys(root, _recipe(s1={"opset": 17}).stages, target, VERSIONS)
    assert changed[0] == base[0] and changed[1] != base[1] and changed[2] != base[2]
    # Inputs, seed, tool versions, code and target facts change every key.
    for other_root in (root_key("x" * 64, b"{}", "e" * 64, 0), root_key("w" * 64, b"{ }", "e" * 64, 0),
                       root_key("w" * 64, b"{}", "f" * 64, 0), root_key("w" * 64, b"{}", "e" * 64, 1)):
        assert not set(stage_keys(other_root, _recipe().stages, target, VERSIONS)) & set(base)
    assert not set(stage_keys(root, _recipe().stages, target, {**VERSIONS, "vlacompile-code": "d"})) & set(base)
    # The target is in the keys of the stages that read it (quantize), not in distill's or export's.
    faster = dataclasses.replace(target, budget=dataclasses.replace(target.budget, control_hz=target.budget.control_hz * 2))
    other = stage_keys(root, _recipe().stages, faster, VERSIONS)
    assert other[:2] == base[:2] and other[2] != base[2]
    thor = stage_keys(root, _recipe().stages, load_target("jetson-thor"), VERSIONS)
    assert thor[:2] == base[:2] and thor[2] != base[2]
    # Where the target file lives is not part of it.
    moved = dataclasses.replace(target, path=str(tmp_path / "elsewhere.toml"))
    assert stage_keys(root, _recipe().stages, moved, VERSIONS) == base


def test_each_stage_key_holds_its_own_code(tmp_path, monkeypatch):
    """An edit to the quantisers changes quantize's code hash, not distill's; one to training.py changes
    distill's. The report, verify and the CLI are in none."""
    import shutil

    import vlacompile
    from vlacompile.cache import _hash_tree, stage_code_files

    pkg = Path(shutil.copytree(Path(vlacompile.__file__).parent, tmp_path / "vlacompile",
                               ignore=shutil.ignore_patterns("__pycache__")))
    rel = {st: {p.relative_to(pkg).as_posix() for p in stage_code_files(f"vlacompile.stages.{st}", pkg)}
           for st in ("distill", "prune", "quantize", "export")}
    assert {"stages/distill.py", "training.py", "families/smolvla/modeling.py", "data/episodes.py"} <= rel["distill"]
    assert "quantizers/ort.py" not in rel["distill"] and "quantizers/ort.py" in rel["quantize"]
    assert not any(r.startswith(("report/", "verify/")) or r in ("cli.py", "pipeline.py") for files in rel.values() for r in files)

    def code(st: str) -> str:
        return _hash_tree(pkg, stage_code_files(f"vlacompile.stages.{st}", pkg))

    before = {st: code(st) for st in rel}
    (pkg / "quantizers" / "ort.py").write_text((pkg / "quantizers" / "ort.py").read_text() + "\n# edited\n")
    after = {st: code(st) for st in rel}
    assert after["distill"] == before["distill"] and after["quantize"] != before["quantize"]
    (pkg / "training.py").write_text((pkg / "training.py").read_text() + "\n# edited\n")
    assert code("distill") != before["distill"]


def test_episodes_hash_follows_content(tmp_path, tiny_episodes):
    h = episodes_hash(tiny_episodes)
    info = tiny_episodes / "meta" / "info.json"
    info.write_text(info.read_text() + " ")
    assert episodes_hash(tiny_episodes) != h


# --- entries ---------------------------------------------------------------------------------


def test_entry_round_trip_and_broken_entries_read_as_missing(tmp_path, tiny_policy):
    import torch

    cache = StageCache(tmp_path / "cache")
    work = tmp_path / "work"
    work.mkdir()
    (work / "student.onnx").write_bytes(b"graph bytes")
    rec = [{"stage": "export", "seconds": 1.0}]
    art = Artifact(policy=tiny_policy, onnx_path=work / "student.onnx", precision="fp32", records=rec)
    assert cache.put("k1", "export", art)
    assert [(e.key, e.stage) for e in cache.entries()] == [("k1", "export")]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]  # temp dir renamed away

    restore = tmp_path / "restore"
    restore.mkdir()
    loaded = cache.load("k1", restore)
    assert loaded.onnx_path == restore / "student.onnx" and loaded.onnx_path.read_bytes() == b"graph bytes"
    assert loaded.records == rec and loaded.precision == "fp32" and not loaded.quantized_torch
    for name, t in tiny_policy.module.state_dict().items():
        assert torch.equal(loaded.policy.module.state_dict()[name], t), name

    # A damaged file (hash mismatch) and a half-written entry (no artifact.json) are misses.
    (cache.root / "k1" / "student.onnx").write_bytes(b"graph bytez")
    assert cache.load("k1", restore) is None
    half = cache.root / "k2"
    (half / "policy").mkdir(parents=True)
    assert not cache.has("k2") and cache.load("k2", restore) is None
    assert [e.stage for e in cache.entries() if e.key == "k2"] == ["(incomplete)"]

    # modelopt fake-quant torch outputs are not cached.
    assert not cache.put("k3", "quantize", Artifact(policy=tiny_policy, quantized_torch=True, precision="int8"))
    assert not (cache.root / "k3").exists()


def test_cache_cli_ls_and_prune(tmp_path, tiny_policy):
    cache = StageCache(tmp_path / "cache")
    for key in ("aaaa1111", "bbbb2222"):
        assert cache.put(key, "distill", Artifact(policy=tiny_policy))
    old = time.time() - 10 * 86400
    os.utime(cache.root / "aaaa1111" / ENTRY_META, (old, old))
    args = ["--cache-dir", str(cache.root)]
    ls = CliRunner().invoke(main, ["cache", "ls", *args])
    assert ls.exit_code == 0 and "aaaa1111" in ls.output and "bbbb2222" in ls.output and "distill" in ls.output
    bad = CliRunner().invoke(main, ["cache", "prune", *args])
    assert bad.exit_code == 2 and "--older-than" in bad.output
    pruned = CliRunner().invoke(main, ["cache", "prune", "--older-than", "7", *args])
    assert pruned.exit_code == 0 and "deleted 1 entries" in pruned.output
    assert [e.key for e in cache.entries()] == ["bbbb2222"]
    assert CliRunner().invoke(main, ["cache", "prune", "--all", *args]).exit_code == 0
    assert cache.entries() == []


# --- builds ----------------------------------------------------------------------------------


def _build(tmp: Path, ckpt: Path, eps: Path, out: str, cache: str | None, recipe: dict | None = None):
    import vlacompile

    toml = tmp / f"{out}.toml"
    toml.write_text(_to_toml(recipe or TINY_RECIPE))
    lines: list[str] = []
    t0 = time.perf_counter()
    result = vlacompile.build(
        "x86-cpu", checkpoint=ckpt, episodes=eps, recipe=toml, out=tmp / out, calls=20, progress=False,
        log=lines.append, cache_dir=tmp / cache if cache else None, use_cache=cache is not None,
    )
    return result, time.perf_counter() - t0, lines


def _toml_value(v) -> str:
    if isinstance(v, dict):  # an inline table
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def _to_toml(recipe: dict) -> str:
    lines = [f'name = "{recipe["name"]}"', f"seed = {recipe['seed']}"]
    for stage in recipe["stages"]:
        lines.append("[[stages]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in stage.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_checkpoint_module, tiny_episodes_module):
    """A cold build, a rebuild with nothing changed, a rebuild with one export parameter changed (all
    on cache A), and a second cold build on cache B."""
    tmp = tmp_path_factory.mktemp("cache-builds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vlacompile.cache.code_hash", lambda: "pinned")
        args = (tmp, tiny_checkpoint_module, tiny_episodes_module)
        changed = json.loads(json.dumps(TINY_RECIPE))
        changed["stages"][1]["max_abs_diff"] = 2e-3
        return {
            "tmp": tmp,
            "cold": _build(*args, "cold", "cache-a"),
            "warm": _build(*args, "warm", "cache-a"),
            "changed": _build(*args, "changed", "cache-a", changed),
            "cold_b": _build(*args, "cold-b", "cache-b"),
        }


def test_rebuild_with_nothing_changed_reuses_every_stage(builds):
    (cold, _, _), (warm, _, log) = builds["cold"], builds["warm"]
    assert [s["reused"] for s in cold.report["stages"]] == [False, False, False]
    assert [s["reused"] for s in warm.report["stages"]] == [True, True, True]
    assert any("cache: reusing distill, export, quantize" in line for line in log)
    assert not any(line.startswith("[1/3] distill") for line in log)
    assert [k["reused"] for k in warm.report["cache"]["keys"]] == [True, True, True]
    assert warm.report["cache"]["keys"] == [dict(k, reused=True) for k in cold.report["cache"]["keys"]]
    # Same student, byte for byte; the reused stages keep their original metrics.
    assert _artifact_hashes(warm.out_dir) == _artifact_hashes(cold.out_dir) and len(_artifact_hashes(cold.out_dir)) == 3
    assert warm.report["stages"][0]["final_loss"] == cold.report["stages"][0]["final_loss"]
    assert warm.report["stages"][0]["original_seconds"] == cold.report["stages"][0]["seconds"]
    assert "reused" in (warm.out_dir / "report.md").read_text()
    # The teacher's held-out actions (a pure function of weights and inputs) come from the cache;
    # the accuracy figures are therefore identical, while latency is measured afresh.
    assert not any("teacher's held-out actions were reused" in n for n in cold.report["notes"])
    assert any("teacher's held-out actions were reused" in n for n in warm.report["notes"])
    assert warm.report["accuracy"]["nmse_vs_teacher"] == cold.report["accuracy"]["nmse_vs_teacher"]
    assert warm.report["accuracy"]["teacher_self_consistency"] == cold.report["accuracy"]["teacher_self_consistency"]


def test_changing_one_parameter_reruns_that_stage_and_later_ones(builds):
    changed, _, log = builds["changed"]
    assert [s["reused"] for s in changed.report["stages"]] == [True, False, False]
    assert any("cache: reusing distill " in line for line in log)
    cold = builds["cold"][0]
    assert changed.report["cache"]["keys"][0]["key"] == cold.report["cache"]["keys"][0]["key"]
    assert changed.report["cache"]["keys"][1]["key"] != cold.report["cache"]["keys"][1]["key"]
    # The tolerance does not change the graph: same bytes, re-exported.
    assert _artifact_hashes(changed.out_dir) == _artifact_hashes(cold.out_dir)


def test_two_cold_builds_are_byte_identical(builds):
    cold, cold_b = builds["cold"][0], builds["cold_b"][0]
    assert [s["reused"] for s in cold_b.report["stages"]] == [False, False, False]
    hashes = _artifact_hashes(cold.out_dir)
    assert set(hashes) == {"student.onnx", "student.int8.onnx", "student/model.safetensors"}
    assert _artifact_hashes(cold_b.out_dir) == hashes
    for name in ("manifest.json", "student/config.json", "recipe.json", "target.json"):
        assert _sha(cold.out_dir / name) == _sha(cold_b.out_dir / name), name


def test_manifest_records_inputs_and_cache_keys(builds, tiny_episodes_module):
    cold = builds["cold"][0]
    manifest = json.loads((cold.out_dir / "manifest.json").read_text())
    assert manifest["inputs"]["episodes_sha256"] == episodes_hash(tiny_episodes_module)
    assert [k["stage"] for k in manifest["cache_keys"]] == ["distill", "export", "quantize"]
    assert [k["key"] for k in manifest["cache_keys"]] == [k["key"] for k in cold.report["cache"]["keys"]]
    assert {e.key for e in StageCache(builds["tmp"] / "cache-a").entries()} >= {k["key"] for k in manifest["cache_keys"]}


def test_a_warm_rebuild_of_a_split_recipe_keeps_every_graph(tmp_path, tiny_checkpoint_module, tiny_episodes_module, monkeypatch):
    """Two Thor builds on one cache: the second reuses every stage and still has system2/system1 and split.json."""
    import vlacompile
    from vlacompile.resources import TARGETS_DIR

    monkeypatch.setattr("vlacompile.cache.code_hash", lambda: "pinned")
    thor = tmp_path / "thor.toml"
    thor.write_text((TARGETS_DIR / "jetson-thor.toml").read_text().replace("actions_per_chunk = 16", "actions_per_chunk = 8"))
    recipe = {"name": "tiny-split", "seed": 0, "stages": [
        {"stage": "distill", "layers": {"expert": [0]}, "flow_steps": 2, "steps": 5, "batch_size": 8, "num_samples": 32},
        {"stage": "quantize", "precision": "int8", "calibration_samples": 8},
        {"stage": "export", "split": True},
    ]}
    (tmp_path / "r.toml").write_text(_to_toml(recipe))

    def build(out: str):
        lines: list[str] = []
        r = vlacompile.build(thor, checkpoint=tiny_checkpoint_module, episodes=tiny_episodes_module, recipe=tmp_path / "r.toml",
                             out=tmp_path / out, calls=20, progress=False, log=lines.append, cache_dir=tmp_path / "cache")
        return r, lines

    # An x86-cpu build first, with the same distillation: the Thor build takes its student from the
    # cache (distill does not read the target), and runs its own quantize and export.
    (tmp_path / "x86.toml").write_text(_to_toml({**recipe, "stages": [recipe["stages"][0], {"stage": "export"}]}))
    vlacompile.build("x86-cpu", checkpoint=tiny_checkpoint_module, episodes=tiny_episodes_module, recipe=tmp_path / "x86.toml",
                     out=tmp_path / "x86", calls=20, progress=False, log=lambda m: None, cache_dir=tmp_path / "cache")
    (cold, cold_log), (warm, log) = build("cold"), build("warm")
    assert any("cache: reusing distill from" in line for line in cold_log), cold_log
    assert [s["reused"] for s in cold.report["stages"]] == [True, False, False]
    assert any("cache: reusing distill, quantize, export" in line for line in log)
    graphs = ("student.onnx", "system2.onnx", "system1.onnx", "split.json")
    for name in graphs:
        assert (warm.out_dir / name).is_file(), name
        assert _sha(warm.out_dir / name) == _sha(cold.out_dir / name), name
    assert warm.report["latency"]["parts"]["flow_steps"] == 2  # per-part latency measured again
    assert set(warm.report["tensorrt_readiness"]) == {"student.onnx", "system2.onnx", "system1.onnx"}


def test_no_cache_writes_nothing(tmp_path, tiny_checkpoint_module, tiny_episodes_module, monkeypatch):
    monkeypatch.setenv("VLACOMPILE_CACHE", str(tmp_path / "env-cache"))
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["stages"][0]["steps"] = 2
    result, _, log = _build(tmp_path, tiny_checkpoint_module, tiny_episodes_module, "nc", None, recipe)
    assert result.report["cache"]["dir"] is None
    assert not (tmp_path / "env-cache").exists()
    assert not any(line.startswith("cache:") for line in log)
