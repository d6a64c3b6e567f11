"""Content-addressed cache of stage outputs, so an unchanged rebuild redoes no compression work.

Keys form a chain. The root key hashes the build's inputs: the teacher's weights and config.json,
the episode files and the split seed. Stage i's key hashes stage i-1's key (the root for the first
stage), the stage's name and canonicalised params, the target profile (without its file path), the
versions of the tools that shape the output (torch, onnx, onnxruntime, modelopt, vlacompile) and the
source of the vlacompile modules that compute stage outputs. Change one recipe parameter and that
stage's key changes, and with it every later key; the stages before it are reused.

An entry is a directory ``<cache>/<key>/`` holding what the stage produced:

* ``policy/`` (``config.json`` + ``model.safetensors``) when the output has a torch policy;
* every exported file when the output is an exported graph: the single graph (+ external data)
  and, for split exports, ``system2.onnx``, ``system1.onnx`` and ``split.json`` (``Artifact.files``);
* ``artifact.json``: stage, precision, exported file names, ``quantized_torch``, the stage records so
  far, and the sha256 of every file, checked on load.

modelopt fake-quant torch outputs (``quantized_torch`` before export) are NOT cached: the quantisers'
calibrated state does not round-trip through a plain safetensors checkpoint. The export after them
is cached: its ONNX graph is the real output, stored with the policy's FP32 weights without the
quantisers, which later steps use only for the spec and the model size (verify, report).

Entries are written into a temporary directory inside the cache and renamed into place, so a killed
build never leaves a half entry under a key; an entry without ``artifact.json`` or with a file whose
hash does not match reads as missing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CACHE_FORMAT = 2  # 2: entries hold every exported file (split graphs and split.json too)
ENTRY_META = "artifact.json"
POLICY_DIR = "policy"
TMP_PREFIX = ".tmp-"
ARRAYS_NAME = "arrays.npz"
# Modules whose source decides what a stage writes; the CLI, the report and verify do not.
NOT_STAGE_CODE = ("cli.py", "pipeline.py", "cache.py", "report", "verify")


def default_cache_dir() -> Path:
    env = os.environ.get("VLACOMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlacompile"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(obj: Any) -> str:
    return _sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _hash_tree(root: Path, files: list[Path]) -> str:
    from vlacompile.checkpoint import sha256_file

    return _digest([[p.relative_to(root).as_posix(), sha256_file(p)] for p in files])


def episodes_hash(ep_dir: Path) -> str:
    """Content hash of an episode directory: every file's relative path and bytes (hidden files skipped)."""
    ep_dir = Path(ep_dir)
    files = sorted(p for p in ep_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ep_dir).parts))
    return _hash_tree(ep_dir, files)


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over the source of the vlacompile modules that compute stage outputs (once per process:
    the code a process runs is the code it imported)."""
    pkg = Path(__file__).resolve().parent
    files = sorted(p for p in pkg.rglob("*.py") if p.relative_to(pkg).parts[0] not in NOT_STAGE_CODE)
    return _hash_tree(pkg, files)


def key_versions() -> dict[str, str]:
    from vlacompile.pipeline import tool_versions

    versions = tool_versions()
    keep = ("vlacompile", "torch", "onnx", "onnxruntime", "nvidia-modelopt")
    return {**{k: versions[k] for k in keep}, "vlacompile-code": code_hash()}


def root_key(teacher_weights_sha256: str, teacher_config: bytes, episodes_sha256: str, seed: int) -> str:
    return _digest(
        {
            "format": CACHE_FORMAT,
            "teacher_weights": teacher_weights_sha256,
            "teacher_config": _sha256_bytes(teacher_config),
            "episodes": episodes_sha256,
            "seed": seed,
        }
    )


def stage_keys(root: str, stages, target, versions: dict[str, str]) -> list[str]:
    """One key per recipe stage (``StageSpec``s), each chained on the previous one."""
    from vlacompile.config_util import to_dict

    target_dict = {k: v for k, v in target.to_dict().items() if k != "path"}
    keys, prev = [], root
    for s in stages:
        prev = _digest({"prev": prev, "stage": s.name, "params": to_dict(s.params), "target": target_dict, "versions": versions})
        keys.append(prev)
    return keys


@dataclass
class Entry:
    key: str
    stage: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch (artifact.json's mtime, touched on every hit)


class StageCache:
    """The cache directory. ``get`` and ``put`` never raise for cache trouble: a broken entry is a
    miss, an unwritable cache is a build without caching (the caller logs why)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def _entry(self, key: str) -> Path:
        return self.root / key

    def _meta(self, key: str) -> dict | None:
        path = self._entry(key) / ENTRY_META
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("key") == key and meta.get("format") == CACHE_FORMAT else None

    def has(self, key: str) -> bool:
        return self._meta(key) is not None

    def is_onnx(self, key: str) -> bool:
        meta = self._meta(key)
        return bool(meta and meta.get("onnx"))

    def _verified(self, key: str) -> dict | None:
        """The entry's metadata if every file it lists is there with its recorded hash."""
        from vlacompile.checkpoint import sha256_file

        meta = self._meta(key)
        if meta is None:
            return None
        entry = self._entry(key)
        for rel, digest in meta.get("files", {}).items():
            p = entry / rel
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return meta

    def restore_onnx(self, key: str, workdir: Path) -> Path | None:
        """Copy an entry's exported files (single graph, split graphs, split.json) into ``workdir``;
        the single graph's path, or None on a miss."""
        meta = self._verified(key)
        if meta is None or not meta.get("onnx"):
            return None
        for name in [*meta["onnx_files"], *meta.get("extra_files", [])]:
            shutil.copyfile(self._entry(key) / name, Path(workdir) / name)
        return Path(workdir) / meta["onnx"]

    def load(self, key: str, workdir: Path):
        """The cached ``Artifact`` for ``key`` (ONNX files copied into ``workdir``), or None."""
        from vlacompile.checkpoint import load_policy
        from vlacompile.errors import VlaCompileError
        from vlacompile.stages import Artifact

        meta = self._verified(key)
        if meta is None or not meta.get("policy"):
            return None
        try:
            policy = load_policy(self._entry(key) / POLICY_DIR)
        except VlaCompileError:
            return None
        onnx_path = self.restore_onnx(key, workdir) if meta.get("onnx") else None
        if meta.get("onnx") and onnx_path is None:
            return None
        os.utime(self._entry(key) / ENTRY_META)  # last use, for `cache prune --older-than`
        return Artifact(
            policy=policy,
            onnx_path=onnx_path,
            precision=meta["precision"],
            quantized_torch=bool(meta["quantized_torch"]),
            records=meta["records"],
            extra_files=tuple(Path(workdir) / name for name in meta.get("extra_files", [])),
        )

    def put(self, key: str, stage: str, artifact) -> bool:
        """Store ``artifact`` under ``key`` atomically. False if not cacheable (fake-quant torch)."""
        if artifact.quantized_torch and artifact.onnx_path is None:
            return False

        def fill(tmp: Path) -> dict:
            from vlacompile.artifact import onnx_files as graph_files

            _save_plain_policy(artifact.policy, tmp / POLICY_DIR)
            onnx_files = [p.name for p in graph_files(Path(artifact.onnx_path))] if artifact.onnx_path is not None else []
            extra = [Path(p).name for p in artifact.extra_files]
            for p in artifact.files:
                shutil.copyfile(p, tmp / Path(p).name)
            return {
                "precision": artifact.precision,
                "quantized_torch": artifact.quantized_torch,
                "policy": True,
                "onnx": Path(artifact.onnx_path).name if artifact.onnx_path is not None else None,
                "onnx_files": onnx_files,
                "extra_files": extra,
                "records": artifact.records,
            }

        return self._write_entry(key, stage, fill)

    def put_arrays(self, key: str, stage: str, arrays: dict[str, "np.ndarray"]) -> bool:
        """Store numeric results (e.g. the teacher's actions on held-out inputs) under ``key``."""
        import numpy as np

        def fill(tmp: Path) -> dict:
            np.savez(tmp / ARRAYS_NAME, **arrays)
            return {"arrays": sorted(arrays)}

        return self._write_entry(key, stage, fill)

    def get_arrays(self, key: str) -> dict[str, "np.ndarray"] | None:
        import numpy as np

        meta = self._verified(key)
        if meta is None or not meta.get("arrays"):
            return None
        with np.load(self._entry(key) / ARRAYS_NAME, allow_pickle=False) as data:
            arrays = {k: data[k] for k in meta["arrays"]}
        os.utime(self._entry(key) / ENTRY_META)
        return arrays

    def _write_entry(self, key: str, stage: str, fill) -> bool:
        """Write an entry into a temp dir (``fill`` writes the files and returns metadata), then rename."""
        from vlacompile.checkpoint import sha256_file

        if self.has(key):
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:16]}-", dir=self.root))
        try:
            extra = fill(tmp)
            test_pause(f"cache-write:{stage}")
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"format": CACHE_FORMAT, "key": key, "stage": stage, **extra, "files": files, "created": time.time()}
            # artifact.json last: an entry is complete exactly when it has one.
            with open(tmp / ENTRY_META, "w") as f:
                f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            dest = self._entry(key)
            if dest.exists():  # a broken entry from older code, or a concurrent build got there first
                if self.has(key):
                    return True
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.rename(tmp, dest)
            except OSError:
                return self.has(key)  # another build renamed its copy into place first
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[Entry]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            meta = self._meta(d.name)
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            if meta is None:
                out.append(Entry(d.name, "(incomplete)", d, size, d.stat().st_mtime))
            else:
                out.append(Entry(d.name, meta["stage"], d, size, (d / ENTRY_META).stat().st_mtime))
        return out

    def prune(self, *, older_than_s: float | None = None) -> list[Entry]:
        """Delete entries unused for ``older_than_s`` seconds (all if None), plus any leftovers of
        killed writes (temporary directories over an hour old). Returns the deleted entries."""
        now = time.time()
        removed = []
        for e in self.entries():
            if older_than_s is None or now - e.last_used > older_than_s:
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e)
        if self.root.is_dir():
            for d in self.root.glob(f"{TMP_PREFIX}*"):
                if older_than_s is None or now - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
        return removed


def _save_plain_policy(policy, directory: Path) -> None:
    """``save_policy``; for a modelopt fake-quant module, its FP32 weights without the quantisers."""
    from vlacompile.checkpoint import save_policy
    from vlacompile.stages.export import is_fake_quantized

    if not is_fake_quantized(policy.module):
        save_policy(policy, directory)
        return
    from vlacompile.families import get_family
    from vlacompile.policy import Policy

    family = get_family(policy.family)
    plain = family.build(policy.config)
    state = policy.module.state_dict()
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    save_policy(Policy(module=plain, config=policy.config, spec=policy.spec, family=policy.family, meta=dict(policy.meta)), directory)


def test_pause(point: str) -> None:
    """TEST HOOK: with ``VLACOMPILE_TEST_PAUSE_AT=<point>`` in the environment, print ``PAUSED <point>``
    to stderr and sleep, so a test can kill the build at a known point (tests/test_atomic.py).
    Points: ``stage:<name>`` (before a stage runs), ``cache-write:<name>`` (a cache entry half
    written), ``report`` (reports written, output not yet moved into place)."""
    if os.environ.get("VLACOMPILE_TEST_PAUSE_AT") == point:
        import sys

        print(f"PAUSED {point}", file=sys.stderr, flush=True)
        time.sleep(600)


test_pause.__test__ = False  # not a pytest test, despite its name
