"""Every verb with every output path pointed where it must not write: directories, files, `.`, `..`
and the inputs themselves. Each is refused before any work (exit 2, the path named, a hint, no
traceback), and nothing any input holds changes, byte for byte: the checkpoint, tokenizer, episodes,
recipe, target, the baseline build, and the working directory (no lock or partial file left).

One tiny build (a few seconds) supplies the artifact that verify, engine, report, report diff and
--baseline take."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import QUICK_RECIPE

from vlacompile.cli import main
from vlacompile.errors import EXIT_INPUT_ERROR, EXIT_OK
from vlacompile.resources import TARGETS_DIR

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE = QUICK_RECIPE


def _tree(root: Path) -> dict[str, str]:
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint_module, tiny_episodes_module):
    tmp = tmp_path_factory.mktemp("paths")
    recipe = tmp / "recipe.toml"
    recipe.write_text(RECIPE)
    target = tmp / "loose.toml"
    target.write_text((TARGETS_DIR / "x86-cpu.toml").read_text().replace("max_nmse = 0.05", "max_nmse = 100.0")
                      .replace("min_cosine = 0.95", "min_cosine = -1.0").replace("p99_latency_ms = 10", "p99_latency_ms = 1000"))
    tokenizer = tmp / "tokenizer"  # the reference family reads none, but --tokenizer is an input all the same
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    work = tmp / "work"  # the working directory of every call: `.` and `..` point here
    work.mkdir()
    (work / "notes.txt").write_text("the user's own file\n")
    base = ["--target", str(target), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module),
            "--recipe", str(recipe), "--quiet", "--calls", "20", "--no-closed-loop", "--cache-dir", str(tmp / "cache")]
    built = tmp / "built"
    result = CliRunner().invoke(main, ["build", *base, "--out", str(built)])
    assert result.exit_code == EXIT_OK, result.output
    (tmp / "plain-dir").mkdir()
    (tmp / "plain-file").write_text("not a directory\n")
    inputs = {"checkpoint": tiny_checkpoint_module, "episodes": tiny_episodes_module, "tokenizer": tokenizer, "recipe": recipe,
              "target": target, "baseline": built, "work": work}
    return {"tmp": tmp, "base": base, "built": built, "work": work, "inputs": inputs, "ckpt": tiny_checkpoint_module,
            "eps": tiny_episodes_module, "tokenizer": tokenizer, "recipe": recipe, "target": target}


def _cases(w: dict) -> list[tuple[str, list[str], str]]:
    """(case id, CLI arguments, the path the error must name)."""
    ckpt, eps, tok, built, tmp = str(w["ckpt"]), str(w["eps"]), str(w["tokenizer"]), str(w["built"]), w["tmp"]
    build = ["build", *w["base"], "--tokenizer", tok, "--baseline", built]
    plain_dir, plain_file = str(tmp / "plain-dir"), str(tmp / "plain-file")
    cases = []
    # build --out: a file, `.`, `..`, and every input (is, inside, holding).
    for name, out in [("file", plain_file), ("dot", "."), ("dotdot", ".."), ("checkpoint", ckpt), ("inside-checkpoint", f"{ckpt}/sub"),
                      ("holds-checkpoint", str(Path(ckpt).parent)), ("episodes", eps), ("inside-episodes", f"{eps}/meta"),
                      ("tokenizer", tok), ("baseline", built), ("recipe-file", str(w["recipe"])), ("checkpoint-file", f"{ckpt}/config.json"),
                      ("stage-cache", str(tmp / "cache"))]:
        cases.append((f"build--out={name}", [*build, "--out", out], out))
    # build --junit: a directory, `.`, an input file, a file inside an input.
    out_ok = str(tmp / "never-written")
    for name, junit in [("dir", plain_dir), ("dot", "."), ("recipe", str(w["recipe"])), ("in-checkpoint", f"{ckpt}/gates.xml"),
                        ("in-episodes", f"{eps}/gates.xml"), ("baseline-report", f"{built}/report.json"), ("under-a-file", f"{plain_file}/g.xml")]:
        cases.append((f"build--junit={name}", [*build, "--out", out_ok, "--junit", junit], junit))
    # build / distill --cache-dir: a file, an input, inside an input.
    for verb in ("build", "distill"):
        args = [*build, "--out", out_ok] if verb == "build" else ["distill", *[a for a in w["base"] if a not in ("--no-closed-loop", "--calls", "20")]]
        i = args.index("--cache-dir")
        for name, cache in [("file", plain_file), ("checkpoint", ckpt), ("in-episodes", f"{eps}/cache")]:
            cases.append((f"{verb}--cache-dir={name}", [*args[:i], *args[i + 2:], "--cache-dir", cache], cache))
    # verify ARTIFACT: a file, `.`, an input that is no artifact; and an artifact that is the teacher given.
    for name, art in [("file", plain_file), ("dot", "."), ("checkpoint", ckpt), ("missing", str(tmp / "no-such-artifact"))]:
        cases.append((f"verify={name}", ["verify", art, "--calls", "20", "--quiet"], art))
    cases.append(("verify--checkpoint=artifact", ["verify", built, "--checkpoint", built, "--calls", "20", "--quiet"], built))
    # engine ARTIFACT [--timing-cache]: the timing cache a directory or `.`; the artifact a file, `.`, an input.
    for name, cache in [("dir", plain_dir), ("dot", ".")]:
        cases.append((f"engine--timing-cache={name}", ["engine", built, "--timing-cache", cache], cache))
    for name, art in [("file", plain_file), ("dot", "."), ("checkpoint", ckpt)]:
        cases.append((f"engine={name}", ["engine", art], art))
    # report ARTIFACT and report diff --out.
    for name, art in [("file", plain_file), ("dot", "."), ("episodes", eps)]:
        cases.append((f"report={name}", ["report", art], art))
    for name, out in [("dir", plain_dir), ("dot", "."), ("old-report", f"{built}/report.json"), ("new-report-md", f"{built}/report.md"),
                      ("artifact-graph", f"{built}/student.onnx"), ("json-twin", f"{built}/report"), ("under-a-file", f"{plain_file}/d.md")]:
        cases.append((f"report-diff--out={name}", ["report", "diff", built, built, "--out", out], out))
    # cache ls / prune --cache-dir: a file, `.` (holds the user's file), an input directory.
    for verb in ("ls", "prune"):
        extra = ["--all"] if verb == "prune" else []
        for name, cache in [("file", plain_file), ("dot", "."), ("checkpoint", ckpt), ("episodes", eps)]:
            cases.append((f"cache-{verb}--cache-dir={name}", ["cache", verb, *extra, "--cache-dir", cache], cache))
    return cases


def test_every_verb_refuses_output_paths_over_inputs_and_changes_no_input(world, monkeypatch):
    monkeypatch.chdir(world["work"])
    before = {k: _tree(Path(p)) for k, p in world["inputs"].items()}
    problems = []
    for case, args, named in _cases(world):
        result = CliRunner().invoke(main, args)
        out = result.output
        clean = isinstance(result.exception, SystemExit) and "Traceback" not in out
        if not (clean and result.exit_code == EXIT_INPUT_ERROR and "Hint:" in out and named in out):
            problems.append(f"{case}: exit {result.exit_code} ({result.exception!r})\n{out[-800:]}")
        after = {k: _tree(Path(p)) for k, p in world["inputs"].items()}
        changed = [k for k in before if after[k] != before[k]]
        if changed:
            problems.append(f"{case}: changed {changed}")
            before = after
    assert not (world["tmp"] / "never-written").exists()
    assert not problems, "\n\n".join(problems)


def test_report_diff_writes_a_new_file_beside_the_builds_it_compares(world, monkeypatch):
    """What the CI script does (`report diff BASE OUT --out OUT/pr-comment.md`): a new file inside a
    build is allowed, and nothing the build holds changes."""
    monkeypatch.chdir(world["work"])
    built = world["built"]
    held = _tree(built)
    result = CliRunner().invoke(main, ["report", "diff", str(built), str(built), "--out", str(built / "pr-comment.md")])
    assert result.exit_code == EXIT_OK, result.output
    after = _tree(built)
    assert {k: v for k, v in after.items() if not k.startswith("pr-comment.md")} == held
    for name in ("pr-comment.md", "pr-comment.md.json"):
        (built / name).unlink()


def test_the_python_api_refuses_the_same_paths(world):
    """The guard lives in the API layer: vlacompile.build and verify_artifact refuse as the CLI does."""
    import vlacompile
    from vlacompile.errors import OutputError
    from vlacompile.pipeline import verify_artifact

    before = _tree(world["ckpt"])
    for out in (world["ckpt"], world["ckpt"] / "inner", world["ckpt"].parent, Path(os.getcwd())):
        with pytest.raises(OutputError) as err:
            vlacompile.build(str(world["target"]), checkpoint=world["ckpt"], episodes=world["eps"], recipe=str(world["recipe"]),
                             out=out, progress=False, closed_loop=False, use_cache=False)
        assert "Hint:" in str(err.value)
    with pytest.raises(OutputError):  # --junit a directory: refused before the build, not after the artifact is replaced
        vlacompile.build(str(world["target"]), checkpoint=world["ckpt"], episodes=world["eps"], recipe=str(world["recipe"]),
                         out=world["tmp"] / "x", junit=world["tmp"], progress=False, closed_loop=False, use_cache=False)
    with pytest.raises(OutputError):  # verify must not write its reports into the teacher
        verify_artifact(world["built"], checkpoint=world["built"].parent, progress=False)
    assert _tree(world["ckpt"]) == before and not (world["tmp"] / "x").exists()
