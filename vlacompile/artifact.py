"""The artifact directory a build writes: every file's name, and the one owner of ``split.json``.

    build/<target>/
      student.onnx (+ .data)           the single graph; student.<precision>.onnx after an ORT quantiser
      system2.onnx, system1.onnx       the split graphs (export.split = true) ...
      split.json                       ... and the glue a generic runner executes (this module's format)
      student/                         the student checkpoint, in its family's format
      student_spec.json                the student's PolicySpec: inputs, cameras, action head, processor
      manifest.json, target.json, recipe.json, report.json, report.md, report.html
      *.plan, engine.json              TensorRT plans, written on the device by `vlacompile engine`

``graph_files`` lists the files of an exported graph set (single graph, split graphs, split.json),
which is what the stage cache stores and restores as one unit.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlacompile.errors import CheckpointError

STUDENT_ONNX = "student.onnx"
SPLIT_NAMES = {"system2": "system2.onnx", "system1": "system1.onnx"}
SPLIT_JSON = "split.json"
STUDENT_DIR = "student"
STUDENT_SPEC_JSON = "student_spec.json"  # what the compiled graphs read and write (PolicySpec)
MANIFEST_JSON = "manifest.json"
TARGET_JSON = "target.json"
RECIPE_JSON = "recipe.json"
REPORT_FILES = ("report.json", "report.md", "report.html")
ENGINE_JSON = "engine.json"
SPLIT_FORMAT = 2


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


def write_split_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / SPLIT_JSON
    path.write_text(json.dumps({"format": SPLIT_FORMAT, **manifest}, indent=2, sort_keys=True) + "\n")
    return path


def read_split_manifest(directory: str | Path) -> dict[str, Any]:
    """split.json: what System 2 and System 1 read and write, and the glue between them (see
    ``vlacompile.families.base.SplitPlan``). Refuses files of another format version."""
    path = Path(directory) / SPLIT_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            "no split.json: this artifact has no System 2 / System 1 graphs",
            source=path.parent,
            hint="build with export.split = true in the recipe",
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"split.json is not valid JSON ({e})", source=path, hint="re-export the artifact") from None
    if meta.get("format") != SPLIT_FORMAT:
        raise CheckpointError(f"split.json has format {meta.get('format')!r}; this vlacompile reads format {SPLIT_FORMAT}",
                              source=path, hint="rebuild the artifact with this vlacompile")
    missing = [k for k in ("system2", "system1", "integrator", "derived", "post", "batch_size", "inputs") if k not in meta]
    if missing:
        raise CheckpointError(f"split.json lacks {missing}", source=path, hint="re-export the artifact")
    return meta


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


def read_student_spec(path: Path) -> dict[str, Any]:
    """``student_spec.json`` with a relative tokenizer directory resolved against the artifact."""
    d = json.loads(Path(path).read_text())
    tok = (d.get("processor") or {}).get("tokenizer_dir")
    if tok and not Path(tok).is_absolute():
        d["processor"] = {**d["processor"], "tokenizer_dir": str(Path(path).parent / tok)}
    return d

