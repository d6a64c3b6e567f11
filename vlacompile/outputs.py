"""Where a command may write: one guard for every output path, run before any work.

A build replaces its output directory as a whole (the previous one is renamed aside, then deleted),
so an ``--out`` that is an input, lies inside one or holds one would destroy that input; one that is
the working directory (or holds it) would rename the directory the user stands in. A file output
(``--junit``, ``report diff --out``, ``--timing-cache``) that is a directory, or that would overwrite
an input, fails only after the work, or loses data. Every such path is therefore checked here, in
the API layer (``vlacompile.build``, ``verify_artifact``, ``report.diff.diff_builds``, the engine),
before anything is read or computed, so the CLI and the Python API refuse it alike (exit 2).

Paths are compared resolved (symlinks followed, ``..`` removed): ``--out ckpt/..`` is the directory
holding the checkpoint, and a symlink to the checkpoint is the checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from vlacompile.errors import OutputError

# (what the input is, its path); a None path is skipped (an option not given).
Inputs = Iterable[tuple[str, "str | Path | None"]]


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inputs(inputs: Inputs) -> list[tuple[str, Path, Path]]:
    return [(what, Path(p), _real(p)) for what, p in inputs if p is not None and str(p) != ""]


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory we may create entries in."""
    parent = Path(os.path.abspath(path.expanduser())).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot be created: {parent} is a file, not a directory", source=path,
                          hint=f"pass {option} under a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot be created: {parent} is not writable", source=path, hint=f"pass {option} on a writable path")


def check_output_dir(out: str | Path, *, inputs: Inputs = (), option: str = "--out", replaced: bool = True,
                     hint: str | None = None) -> Path:
    """A directory the command writes: refused when it is a file, the file system root, the working
    directory or one holding it (``replaced``: the command renames it), an input, inside an input,
    or (``replaced``) one that holds an input. Returns the resolved path."""
    path = Path(out).expanduser()
    real = _real(path)
    if path.exists() and not path.is_dir():
        raise OutputError("exists and is not a directory", source=path, hint=f"pass {option} with a directory path")
    if real.parent == real:
        raise OutputError("is the file system root", source=path, hint=f"pass {option} with a directory of its own, e.g. build/x86-cpu")
    cwd = Path.cwd().resolve()
    if replaced and (real == cwd or real in cwd.parents):
        raise OutputError(
            "is the working directory" if real == cwd else f"holds the working directory ({cwd})",
            source=out,
            hint=f"the build replaces {option} as a whole when it completes: pass a directory of its own, e.g. {option} build/x86-cpu",
        )
    for what, given, inp in _inputs(inputs):
        rel = _relation(real, inp)
        if rel == "contains" and not replaced:
            continue  # writing new entries beside an input changes nothing it holds
        if rel is not None:
            effect = ("would be replaced by the output" if rel != "lies inside" else "would gain the output's files") if replaced \
                else "would be written into"
            raise OutputError(
                f"{rel} the {what} ({given}), which {effect}",
                source=out,
                hint=hint or f"pass {option} with a directory outside every input (checkpoint, tokenizer, episodes, baseline, recipe, "
                             "target)",
            )
    return real


def check_output_file(path: str | Path, *, inputs: Inputs = (), protected: Iterable[tuple[str, Path]] = (), option: str,
                      example: str = "report.xml") -> Path:
    """A file the command writes: refused when it is a directory, would land in (or be) an input,
    or would overwrite one of the ``protected`` files (what an input artifact holds); its parent
    must be a directory we can create. Returns the resolved path."""
    p = Path(path).expanduser()
    real = _real(p)
    if p.is_dir():
        raise OutputError("is a directory", source=path, hint=f"pass {option} with a file path, e.g. {Path(path) / example}")
    for what, given, inp in _inputs(inputs):
        if real == inp or inp in real.parents:
            raise OutputError(f"{'is' if real == inp else 'lies inside'} the {what} ({given}), which must not change",
                              source=path, hint=f"pass {option} with a path outside every input")
    for what, file in protected:
        if real == _real(file):
            raise OutputError(f"would overwrite {file}, a file of the {what}", source=path,
                              hint=f"pass {option} with a path of its own")
    _writable_parent(p, option)
    return real


def check_cache_dir(path: str | Path, *, inputs: Inputs = (), option: str = "--cache-dir") -> Path:
    """The stage cache: a directory (it may not exist yet) that is not an input nor inside one
    (entries would be written into it); holding an input is harmless (entries are new subdirectories)."""
    return check_output_dir(path, inputs=inputs, option=option, replaced=False)
