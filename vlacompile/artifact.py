"""The artifact directory a build writes: every file's name, and the one owner of ``split.json``.

    build/<target>/
      student.onnx (+ .data)           the single graph; student.<precision>.onnx after an ORT quantiser
      system2.onnx, system1.onnx       the split graphs (export.split = true) ...
      split.json                       ... and the glue a generic runner executes (this module's format)
      student/                         the student checkpoint, in its family's format
      student_spec.json                the student's PolicySpec: inputs, cameras, action head, processor
      manifest.json, target.json, recipe.json, report.json, report.md, report.html
                                       (manifest.json's format_version, onnx and runtime_files: what the
                                       runtime checks, see vlacompile_runtime.artifact)
      *.plan, engine.json              TensorRT plans, written on the device by `vlacompile engine`

``graph_files`` lists the files of an exported graph set (single graph, split graphs, split.json),
which is what the stage cache stores and restores as one unit.

The runtime (``vlacompile_runtime.artifact``, ``.split``) owns reading what it runs: split.json,
student_spec.json and manifest.json's runtime keys; their names and readers are re-exported here.
This module is the compiler's reader of an artifact's ``manifest.json`` and ``report.json`` (for
verify, engine, report, report diff and --baseline): a missing, truncated or edited file, one of
another schema, or one that lacks a section the caller reads is an ``ArtifactError`` naming the
file and the keys, never a KeyError or JSONDecodeError.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlacompile_runtime.artifact import (  # noqa: F401  (the runtime reads these files; re-exported)
    FORMAT_VERSION,
    MANIFEST_JSON,
    STUDENT_DIR,
    STUDENT_ONNX,
    STUDENT_SPEC_JSON,
    TARGET_JSON,
    read_json_object,
    read_student_spec,
    runtime_files,
)
from vlacompile_runtime.split import SPLIT_FORMAT, SPLIT_JSON, read_split_manifest  # noqa: F401

from vlacompile.errors import ArtifactError

SPLIT_NAMES = {"system2": "system2.onnx", "system1": "system1.onnx"}
RECIPE_JSON = "recipe.json"
REPORT_FILES = ("report.json", "report.md", "report.html")
ENGINE_JSON = "engine.json"
SCHEMA_MAJOR = "1"  # report.json / manifest.json schema_version "1.x" is what this vlacompile writes and reads

# What each reader needs (dotted paths), checked when the file is read.
MANIFEST_KEYS = ("schema_version", "inputs.teacher", "inputs.teacher_weights_sha256", "inputs.episodes_sha256", "seed", "onnx",
                 "precision")
REPORT_KEYS = ("schema_version", "target", "status", "gates.gates")
# verify rewrites the report from these; diff and --baseline compare (and gate on) these.
VERIFY_REPORT_KEYS = (*REPORT_KEYS, "student.onnx", "student.precision", "student.flow_steps", "episodes.path")
COMPARE_REPORT_KEYS = (*REPORT_KEYS, "accuracy.nmse_vs_teacher")
# `vlacompile report` prints the summary and exits with the build's code.
SUMMARY_REPORT_KEYS = (*COMPARE_REPORT_KEYS, "student.onnx", "exit_code")


def onnx_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def split_files(directory: Path) -> list[Path]:
    """The split graphs (with external data) and split.json in ``directory``, if it has them."""
    directory = Path(directory)
    if not (directory / SPLIT_JSON).is_file():
        return []
    meta = read_split_manifest(directory)
    return [*onnx_files(directory / meta["system2"]["onnx"]), *onnx_files(directory / meta["system1"]["onnx"]), directory / SPLIT_JSON]


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def runtime_manifest(directory: Path, onnx: str | None) -> dict[str, Any]:
    """manifest.json's keys the runtime reads (``vlacompile_runtime.artifact``): the format version,
    the single graph to run (``onnx``) and the sha256 of every file the runtime reads in ``directory``
    (student_spec.json, written before this is called, the graphs, split.json, the tokenizer)."""
    directory = Path(directory)
    split = read_split_manifest(directory) if (directory / SPLIT_JSON).is_file() else None
    spec = read_json_object(directory / STUDENT_SPEC_JSON)
    names = runtime_files(directory, onnx, split, spec)
    return {"format_version": FORMAT_VERSION, "onnx": onnx,
            "runtime_files": {n: sha256_files([directory / n]) for n in names}}


def write_split_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / SPLIT_JSON
    path.write_text(json.dumps({"format": SPLIT_FORMAT, **manifest}, indent=2, sort_keys=True) + "\n")
    return path


def student_spec_dict(spec, out_dir: Path) -> dict[str, Any]:
    """The student's PolicySpec as ``student_spec.json`` holds it: a tokenizer directory that the
    artifact carries (``student/<dir>/``, copied there with the student) is named relative to the
    artifact, so a copied artifact still finds it."""
    d = spec.to_dict()
    tok = (d.get("processor") or {}).get("tokenizer_dir")
    student = Path(out_dir) / STUDENT_DIR
    if tok and student.is_dir():
        src = Path(tok) / "tokenizer.json"
        for sub in sorted(p for p in student.iterdir() if p.is_dir()):
            copy = sub / "tokenizer.json"
            if src.is_file() and copy.is_file() and copy.read_bytes() == src.read_bytes():
                d["processor"] = {**d["processor"], "tokenizer_dir": f"{STUDENT_DIR}/{sub.name}"}
                break
    return d


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def check_sections(data: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """``data`` (a report or manifest) has the schema this vlacompile reads (when it names one, or
    ``keys`` require it) and every key in ``keys``."""
    version = data.get("schema_version")
    if ("schema_version" in keys or version is not None) and (not isinstance(version, str) or version.split(".")[0] != SCHEMA_MAJOR):
        raise ArtifactError(
            f"{path.name} has schema_version {version!r}; this vlacompile reads {SCHEMA_MAJOR}.x",
            source=path,
            hint="compare builds made by the same vlacompile major version: rebuild the older one with this vlacompile",
        )
    missing = [k for k in keys if _get(data, k) is None]
    if missing:
        raise ArtifactError(f"{path.name} lacks {missing}", source=path,
                            hint="the file is truncated, was edited, or is not one `vlacompile build` wrote: rebuild the artifact")
    gates = _get(data, "gates.gates")
    if gates is not None and (not isinstance(gates, list) or not all(isinstance(g, dict) and "name" in g and "status" in g for g in gates)):
        raise ArtifactError(f"{path.name}'s gates.gates is not a list of {{name, status, ...}} gates", source=path,
                            hint="the file was edited or is not one `vlacompile build` wrote: rebuild the artifact")
    files = _get(data, "artifact.files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, dict) and "path" in f and "sha256" in f for f in files)):
        raise ArtifactError(f"{path.name}'s artifact.files is not a list of {{path, sha256}}", source=path,
                            hint="the file was edited or is not one `vlacompile build` wrote: rebuild the artifact")


def read_manifest(directory: str | Path, keys: tuple[str, ...] = MANIFEST_KEYS) -> dict[str, Any]:
    """An artifact's manifest.json, checked for the schema and ``keys``."""
    path = Path(directory) / MANIFEST_JSON
    data = read_json_object(path)
    check_sections(data, keys, path)
    return data


def report_path(path: str | Path) -> Path:
    """report.json of a build directory, or the file itself."""
    path = Path(path)
    return path / "report.json" if path.is_dir() else path


def read_report(path: str | Path, keys: tuple[str, ...] = REPORT_KEYS) -> dict[str, Any]:
    """A build's report.json (from its directory or the file), checked for the schema and ``keys``."""
    file = report_path(path)
    if not file.is_file():
        raise ArtifactError("no report.json here", source=path, hint="pass a directory written by `vlacompile build` (or its report.json)")
    data = read_json_object(file)
    check_sections(data, keys, file)
    return data


def held_files(path: str | Path, report: dict[str, Any]) -> list[Path]:
    """The files a build directory holds according to its report (its artifact files, the reports, the
    manifest): what a command that takes the build as an input must not overwrite."""
    file = report_path(path)
    root = file.parent
    names = {f["path"] for f in _get(report, "artifact.files") or []} | set(REPORT_FILES) | {MANIFEST_JSON, TARGET_JSON, RECIPE_JSON}
    return [file, *(root / n for n in sorted(names))]
