"""Reading what the runtime runs from an artifact directory (the compiler writes it;
``vlacompile.artifact`` names every other file):

    build/<target>/
      manifest.json        format_version, the graph to run ("onnx") and the sha256 of every file
                           the runtime reads ("runtime_files"), besides the compiler's own keys
      student_spec.json    the student's PolicySpec: inputs, cameras, action head, preprocessor settings
      student.onnx (+ .data), or system2.onnx + system1.onnx + split.json
      student/<dir>/tokenizer.json   the tokenizer the preprocessor reads (SmolVLA, pi0, pi0.5)
      target.json          the robot's control rate and the actions executed per chunk

A missing or unreadable file, a file whose bytes are not the ones manifest.json recorded, and a
format version newer than this runtime's are ``ArtifactError``s naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlacompile_runtime.errors import ArtifactError

FORMAT_VERSION = 1  # what this runtime reads; the compiler that ships with it writes the same
STUDENT_ONNX = "student.onnx"
STUDENT_DIR = "student"
STUDENT_SPEC_JSON = "student_spec.json"
MANIFEST_JSON = "manifest.json"
TARGET_JSON = "target.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_json_object(path: Path, *, hint: str = "rebuild the artifact: the file is truncated or was edited") -> dict[str, Any]:
    """An artifact's JSON file as a dict; a missing, unreadable or non-object file is an ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no {path.name}" + (" (it is a directory)" if path.is_dir() else ""), source=path.parent,
                            hint="pass a directory written by `vlacompile build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path.name} cannot be read ({e})", source=path, hint=hint) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path.name} holds a JSON {type(data).__name__}, not an object", source=path, hint=hint)
    return data


def read_student_spec(path: Path) -> dict[str, Any]:
    """``student_spec.json`` with a relative tokenizer directory resolved against the artifact."""
    d = read_json_object(Path(path))
    tok = (d.get("processor") or {}).get("tokenizer_dir")
    if tok and not Path(tok).is_absolute():
        d["processor"] = {**d["processor"], "tokenizer_dir": str(Path(path).parent / tok)}
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def graph_files(path: Path) -> list[Path]:
    """A graph file and its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def runtime_files(directory: Path, onnx: str | None, split: dict[str, Any] | None, spec: dict[str, Any]) -> list[str]:
    """What the runtime reads from ``directory`` (relative paths): the single graph ``onnx`` and the
    split graphs of ``split`` (each with external data), split.json, student_spec.json and the
    tokenizer files the spec names inside the artifact."""
    directory = Path(directory)
    names = [STUDENT_SPEC_JSON]
    if onnx:
        names += [p.name for p in graph_files(directory / onnx)]
    if split is not None:
        names += [p.name for part in ("system2", "system1") for p in graph_files(directory / split[part]["onnx"])]
        names.append("split.json")
    tok = (spec.get("processor") or {}).get("tokenizer_dir")
    if tok and not Path(tok).is_absolute():
        names += [f"{tok}/{f}" for f in TOKENIZER_FILES if (directory / tok / f).is_file()]
    return names


def read_runtime_manifest(directory: Path) -> dict[str, Any]:
    """manifest.json's runtime keys, checked: a format this runtime reads, and the file hashes."""
    path = Path(directory) / MANIFEST_JSON
    data = read_json_object(path)
    version = data.get("format_version")
    if version is None:
        raise ArtifactError("states no format_version: the artifact was built by a vlacompile older than the runtime",
                            source=path, hint="rebuild the artifact with the vlacompile that came with this runtime")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"format_version is {version!r}, not an integer", source=path, hint="rebuild the artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"the artifact has format_version {version}; this vlacompile-runtime reads format {FORMAT_VERSION} and older",
                            source=path, hint=f"install the vlacompile-runtime that came with the vlacompile that built it "
                                              f"(pip install -U vlacompile-runtime), or rebuild the artifact with format {FORMAT_VERSION}")
    files = data.get("runtime_files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError("lacks runtime_files (the sha256 of every file the runtime reads)", source=path,
                            hint="rebuild the artifact: manifest.json is truncated or was edited")
    return data


def check_file(directory: Path, name: str, manifest: dict[str, Any]) -> Path:
    """``directory/name``, present and with the bytes manifest.json recorded."""
    path = Path(directory) / name
    want = manifest["runtime_files"].get(name)
    if not path.is_file():
        raise ArtifactError(f"the artifact has no {name}" + (" (it is a directory)" if path.is_dir() else ""), source=path,
                            hint="copy the whole artifact directory `vlacompile build` wrote")
    if want is None:
        raise ArtifactError(f"manifest.json records no sha256 for {name}", source=Path(directory) / MANIFEST_JSON,
                            hint="rebuild the artifact: manifest.json does not belong to these files")
    got = sha256_file(path)
    if got != want:
        raise ArtifactError(f"its bytes differ from those manifest.json recorded (sha256 {got[:16]}..., recorded {want[:16]}...)",
                            source=path, hint="the file was changed or damaged after the build: copy the artifact again, or rebuild it")
    return path
