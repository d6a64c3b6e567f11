"""Artifacts the runtime loads, written from a policy as `vlacompile build` writes them (the graphs,
student_spec.json with the tokenizer carried inside, target.json, manifest.json's runtime keys), and
the observations of held-out episodes in LeRobot's keys.

``export_case``: an artifact, the observations, the noise and the compiler's ONNX Runtime chunks,
written where ``runtime/tests/check_torch_free.py`` reads them (a torch-free environment loads the
artifact and must give the same chunks)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vlacompile.artifact import MANIFEST_JSON, STUDENT_DIR, STUDENT_SPEC_JSON, TARGET_JSON, runtime_manifest, student_spec_dict
from vlacompile.data.episodes import split_episodes
from vlacompile.data.sampling import make_samples
from vlacompile.observation import IMAGE_PREFIX, STATE_KEY
from vlacompile.policy import Policy
from vlacompile.stages.export import export_policy, export_split
from vlacompile.targets import load_target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_artifact(policy: Policy, out: Path, *, split: bool = True, target: str = "x86-cpu") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_policy(policy, out / "student.onnx")
    if split:
        export_split(policy, out)
    tok = policy.spec.processor_settings.get("tokenizer_dir")
    if tok:  # the build's student/ carries its tokenizer; student_spec.json names the copy
        dst = out / STUDENT_DIR / "tokenizer"
        dst.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(tok) / name).is_file():
                shutil.copy2(Path(tok) / name, dst / name)
    spec = student_spec_dict(policy.spec, out)
    assert not tok or not Path(spec["processor"]["tokenizer_dir"]).is_absolute(), spec["processor"]
    (out / STUDENT_SPEC_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    (out / TARGET_JSON).write_text(json.dumps(load_target(target).to_dict(), indent=2, sort_keys=True) + "\n")
    manifest = {"schema_version": "1.0", **runtime_manifest(out, "student.onnx")}
    (out / MANIFEST_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def held_out_observations(episodes, spec, *, stride: int = 7, limit: int = 6, seed: int = 0) -> list[dict]:
    """Observations of the held-out episodes (``split_episodes`` with ``seed``), in LeRobot's keys."""
    _, _, held_out = split_episodes(episodes, seed=seed)
    s = make_samples(held_out, chunk_size=spec.chunk_size, stride=stride)
    rows = range(min(limit, len(s)))
    return [{**{f"{IMAGE_PREFIX}{c}": s.images[c][i] for c in s.images}, STATE_KEY: s.state[i].astype(np.float32), "task": s.tasks[i]}
            for i in rows]


def noises(spec, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(spec.noise_shape, dtype=np.float32) for _ in range(n)]


def export_case(root: Path, name: str, artifact: Path, observations: list[dict], noise: list[np.ndarray],
                expected: dict[str, list[np.ndarray]]) -> Path:
    """``root/name/``: ``artifact/`` (a copy), ``cases.npz`` (observations, noise, the compiler's
    chunks per graph) and ``cases.json`` (the tasks, the keys)."""
    case = Path(root) / name
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(artifact, case / "artifact")
    arrays, meta = {}, []
    for i, (obs, z) in enumerate(zip(observations, noise, strict=True)):
        for k, v in obs.items():
            if k != "task":
                arrays[f"{i}/{k}"] = np.asarray(v)
        arrays[f"{i}/noise"] = z
        for graph, chunks in expected.items():
            arrays[f"{i}/expected.{graph}"] = chunks[i]
        meta.append({"task": obs["task"], "keys": sorted(k for k in obs if k != "task")})
    np.savez(case / "cases.npz", **arrays)
    (case / "cases.json").write_text(json.dumps({"cases": meta, "graphs": sorted(expected)}, indent=2) + "\n")
    return case
