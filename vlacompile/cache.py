"""Content-addressed cache of stage outputs, so an unchanged rebuild redoes no compression work.

Keys form a chain. The root key hashes the build's inputs: the teacher's weights and config.json,
the episode files (and any selection from them) and the split seed. Stage i's key hashes stage i-1's
key (the root for the first stage), the stage's name and canonicalised params, the versions of the
tools that shape the output (torch, onnx, onnxruntime, modelopt, vlacompile), the source of the
stage's module and of every vlacompile module it imports, and the target profile (without its file
path) for the stages that read it: quantize does; distill, prune and export do not, so building a
second target with the same distillation reuses it. Change one recipe parameter and that stage's
key changes, and with it every later key; the stages before it are reused.

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

import ast
import functools
import hashlib
import json
import os
import re
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
JSON_NAME = "result.json"
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


_MODULE_NAME = re.compile(r"^vlacompile(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _module_file(pkg: Path, name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return pkg / "__init__.py"
    rel = Path(*parts)
    for cand in (pkg / rel.with_suffix(".py"), pkg / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(pkg: Path, path: Path) -> set[str]:
    """The vlacompile modules ``path`` imports, anywhere in it (lazy imports in functions too), and the
    module names it spells out as strings (registries such as the families' import by name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = ".".join(("vlacompile", *path.relative_to(pkg).with_suffix("").parts))
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    if package.endswith(".__init__"):
        package = package[: -len(".__init__")]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.match(node.value):
            names = [node.value]
        for name in names:
            if name.startswith("vlacompile"):
                # a module, and every package above it (importing a.b.c runs a/__init__ and a/b/__init__)
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


@functools.lru_cache(maxsize=None)
def stage_code_hash(stage_module: str) -> str:
    """sha256 over the source of ``stage_module`` and every vlacompile module it imports, transitively
    (once per process: the code a process runs is the code it imported). A stage's key changes with
    its own code, not with an edit to the report or to another stage."""
    pkg = Path(__file__).resolve().parent
    return _hash_tree(pkg, stage_code_files(stage_module, pkg))


def stage_code_files(stage_module: str, pkg: Path) -> list[Path]:
    """The files of the vlacompile package at ``pkg`` that ``stage_module`` runs (NOT_STAGE_CODE aside)."""
    seen: set[Path] = set()
    todo = [stage_module]
    while todo:
        f = _module_file(pkg, todo.pop())
        if f is None or f in seen or f.relative_to(pkg).parts[0] in NOT_STAGE_CODE:
            continue
        seen.add(f)
        # The package's own __init__ only re-exports the API lazily (build, load_policy, ...): its
        # function-level imports are not a stage's code.
        if f != pkg / "__init__.py":
            todo.extend(_imports(pkg, f))
    return sorted(seen)


def code_hash() -> str:
    """The code part of every stage's key; "" to use each stage's own (``stage_code_hash``). Tests pin it."""
    return ""


def key_versions() -> dict[str, str]:
    from vlacompile.pipeline import tool_versions

    versions = tool_versions()
    keep = ("vlacompile", "torch", "onnx", "onnxruntime", "nvidia-modelopt")
    return {k: versions[k] for k in keep}


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
    """One key per recipe stage (``StageSpec``s), each chained on the previous one: the stage's name and
    params, the tool versions, its own code, and the target profile only for stages that read it
    (quantize; distill, prune and export do not), so one distillation serves every target."""
    from vlacompile.config_util import to_dict
    from vlacompile.stages import STAGES

    target_dict = {k: v for k, v in target.to_dict().items() if k != "path"}
    pinned = code_hash()
    keys, prev = [], root
    for s in stages:
        stage = STAGES[s.name]
        code = versions.get("vlacompile-code") or pinned or stage_code_hash(f"vlacompile.stages.{stage.module}")
        record = {"prev": prev, "stage": s.name, "params": to_dict(s.params),
                  "versions": {**versions, "vlacompile-code": code}}
        facts = getattr(stage.load(), "key_facts", None)  # what a param resolves to on this machine ("auto")
        if facts is not None:
            record["facts"] = facts(s.params)
        if stage.reads_target:
            record["target"] = target_dict
        prev = _digest(record)
        keys.append(prev)
    return keys


_KEY_NAME = re.compile(r"[0-9a-f]{8,64}")  # entry directories are named by their key (a sha256 hex digest)


def check_cache_root(root: str | Path, option: str = "--cache-dir") -> None:
    """For `cache ls` / `cache prune`: ``root`` is a stage cache (or does not exist yet). A file, or a
    directory holding anything but entries (a checkpoint, a dataset, a home directory), is refused:
    prune deletes the directories in it."""
    from vlacompile.errors import OutputError

    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise OutputError("is a file, not a stage cache directory", source=root,
                          hint=f"pass {option} with the cache directory builds use (default ~/.cache/vlacompile)")
    if root.is_dir():
        stray = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and not (
            p.is_dir() and ((p / ENTRY_META).is_file() or _KEY_NAME.fullmatch(p.name))))
        if stray:
            raise OutputError(f"is not a vlacompile stage cache: it holds what no build wrote ({', '.join(stray[:3])}"
                              + (", ..." if len(stray) > 3 else "") + ")", source=root,
                              hint=f"pass {option} with the cache directory builds use (default ~/.cache/vlacompile)")


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

    def __init__(self, root: str | Path, read_only: bool = False):
        self.root = Path(root).expanduser()
        # Every process of a multi-process (torchrun) run reads the cache; only the first writes it.
        self.read_only = read_only

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

    def put_json(self, key: str, stage: str, value: Any) -> bool:
        """Store a JSON-ready result (e.g. closed-loop rollouts) under ``key``."""

        def fill(tmp: Path) -> dict:
            (tmp / JSON_NAME).write_text(json.dumps(value, sort_keys=True))
            return {"json": JSON_NAME}

        return self._write_entry(key, stage, fill)

    def get_json(self, key: str) -> Any | None:
        meta = self._verified(key)
        if meta is None or not meta.get("json"):
            return None
        try:
            value = json.loads((self._entry(key) / JSON_NAME).read_text())
        except (OSError, ValueError):
            return None
        os.utime(self._entry(key) / ENTRY_META)
        return value

    def _write_entry(self, key: str, stage: str, fill) -> bool:
        """Write an entry into a temp dir (``fill`` writes the files and returns metadata), then rename."""
        from vlacompile.checkpoint import sha256_file

        if self.has(key) or self.read_only:
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
            if e.stage == "(incomplete)" and not _KEY_NAME.fullmatch(e.key):
                continue  # not named like an entry: nothing a build wrote, so nothing prune may delete
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
