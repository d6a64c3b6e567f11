"""Bad input, one test per class of issue 18's findings: each is refused at its cause, before any
work, with exit 2, the input named and a `Hint:`; none ends in a traceback or passes silently.

Output paths over inputs (the data loss class) and every verb's output paths are in
tests/test_output_paths.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import QUICK_RECIPE

from vlacompile.cli import main
from vlacompile.errors import EXIT_INPUT_ERROR, EXIT_OK, CheckpointError, ConfigError, VlaCompileError
from vlacompile.resources import TARGETS_DIR

pytestmark = pytest.mark.usefixtures("single_thread")

TESTS = Path(__file__).parent
PI0 = TESTS / "families" / "pi0" / "fixtures"
SMOLVLA = TESTS / "families" / "smolvla" / "fixtures"

RECIPE = QUICK_RECIPE


def _loose_target(path: Path) -> Path:
    path.write_text((TARGETS_DIR / "x86-cpu.toml").read_text().replace("max_nmse = 0.05", "max_nmse = 100.0")
                    .replace("min_cosine = 0.95", "min_cosine = -1.0").replace("p99_latency_ms = 10", "p99_latency_ms = 1000"))
    return path


def _cli(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit)), \
        f"{result.exception!r}\n{result.output}"
    return result


def _refused(result, *names: str) -> None:
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Hint:" in result.output, result.output
    for name in names:
        assert name in result.output, (name, result.output)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint_module, tiny_episodes_module):
    tmp = tmp_path_factory.mktemp("bad-input")
    recipe = tmp / "recipe.toml"
    recipe.write_text(RECIPE)
    target = _loose_target(tmp / "loose.toml")
    common = ["--target", str(target), "--checkpoint", str(tiny_checkpoint_module), "--episodes", str(tiny_episodes_module),
              "--quiet", "--calls", "20", "--no-closed-loop", "--cache-dir", str(tmp / "cache")]
    out = tmp / "built"
    result = _cli(["build", *common, "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == EXIT_OK, result.output
    return {"tmp": tmp, "out": out, "common": common, "recipe": recipe, "target": target}


# -- accepted silently ------------------------------------------------------------------------


def _tokenizer_with(tmp: Path, kind: str) -> Path:
    src = PI0 / "pi05_two_cams" / "tokenizer"
    if kind == "smolvla":
        return SMOLVLA / "half_expert" / "vlm"
    out = tmp / f"tok-{kind}"
    shutil.copytree(src, out)
    if kind == "class":
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2TokenizerFast"}))
    elif kind == "vocabulary":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        tok.add_tokens([f"<extra_{i}>" for i in range(400)])  # more tokens than the checkpoint's 320 embedding rows
        tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize("kind, words", [("smolvla", ["special tokens", "<bos>"]), ("class", ["GPT2TokenizerFast", "Gemma"]),
                                         ("vocabulary", ["embedding", "320 rows"])])
def test_a_tokenizer_of_another_model_is_refused(tmp_path, kind, words):
    """A pi0.5 checkpoint given SmolVLA's tokenizer built and passed: the tokenizer is now checked
    against the checkpoint (class, vocabulary vs embedding rows, special ids) when it loads."""
    from vlacompile.checkpoint import load_policy

    tok = _tokenizer_with(tmp_path, kind)
    with pytest.raises(CheckpointError) as err:
        load_policy(PI0 / "pi05_two_cams" / "policy", tokenizer=tok)
    text = err.value.format()
    assert str(tok) in text and "Hint:" in text and "paligemma" in text, text
    for word in words:
        assert word in text, (word, text)
    # Through the CLI: exit 2, the tokenizer named, nothing built.
    fx = PI0 / "pi05_two_cams"
    result = _cli(["build", "--quiet", "--no-closed-loop", "-c", str(fx / "policy"), "--tokenizer", str(tok), "-e", str(fx / "episodes"),
                   "--out", str(tmp_path / "out")])
    _refused(result, str(tok))
    assert not (tmp_path / "out").exists()


def test_the_own_tokenizers_still_load():
    from vlacompile.checkpoint import load_policy

    for name in ("pi0_two_cams", "pi05_two_cams", "pi0_empty_cam_kv2", "pi05_three_cams_mha"):
        assert load_policy(PI0 / name / "policy", tokenizer=PI0 / name / "tokenizer").family == "pi0"


def test_a_same_family_student_shape_is_honoured(built, tiny_checkpoint_module, tiny_episodes_module):
    """distill.student of the teacher's own family was ignored (the student kept the teacher's size);
    it is built fresh in that shape, trained on the teacher's chunks and verified on independent noise."""
    import vlacompile

    tmp = built["tmp"]
    recipe = tmp / "same-family.toml"
    recipe.write_text("""
[[stages]]
stage = "distill"
student = { family = "vlacompile-reference", layers = 1, width = 32, heads = 2, image_size = 32 }
flow_steps = 2
steps = 3
batch_size = 8
num_samples = 16
[[stages]]
stage = "export"
""")
    result = vlacompile.build(str(built["target"]), checkpoint=tiny_checkpoint_module, episodes=tiny_episodes_module, recipe=str(recipe),
                              out=tmp / "same-family", calls=20, progress=False, closed_loop=False, cache_dir=tmp / "cache", log=lambda m: None)
    r = result.report
    cfg = r["student"]["config"]
    assert r["student"]["family"] == r["teacher"]["family"] == "vlacompile-reference"
    assert (cfg["vision_width"], cfg["backbone_width"], cfg["expert_width"]) == (32, 32, 32)
    assert (cfg["vision_heads"], cfg["backbone_heads"], cfg["expert_heads"]) == ([2], [2], [2])
    assert r["student"]["flow_steps"] == 2 and r["student"]["params"] < r["teacher"]["params"] / 2
    assert r["stages"][0]["objective"] == "flow" and r["accuracy"]["independent_noise"] is True


@pytest.mark.parametrize("student, words", [
    ('{ family = "vlacompile-reference", layers = 2, width = 64, heads = -2 }', ["distill.student.heads", "-2"]),
    ('{ family = "vlacompile-reference", layers = 0 }', ["distill.student.layers"]),
    ('{ family = "vlacompile-reference", width = "wide" }', ["distill.student.width", "wide"]),
    ('{ family = "vlacompile-reference", vision_heads = [2, 0], vision_mlp = [8, 8] }', ["distill.student.vision_heads[1]"]),
    ('{ family = "vlacompile-reference", chunk_size = 99 }', ["distill.student.chunk_size", "99", "teacher's chunk"]),
    ('{ family = "vlacompile-reference", depth = 3 }', ["distill.student sets ['depth']"]),
    ('{ family = "smolvla", layers = 2 }', ["distill.student.family", "smolvla", "freshly initialised"]),
])
def test_a_student_shape_is_checked_before_any_work(built, tiny_checkpoint_module, tiny_episodes_module, monkeypatch, student, words):
    """A bad distill.student failed after distillation started, naming neither the recipe nor the key."""
    import vlacompile
    import vlacompile.stages.distill as distill

    def never(*args, **kwargs):
        raise AssertionError("the distill stage ran")

    monkeypatch.setattr(distill, "run", never)
    recipe = built["tmp"] / "bad-student.toml"
    recipe.write_text(f"[[stages]]\nstage = \"distill\"\nstudent = {student}\n[[stages]]\nstage = \"export\"\n")
    with pytest.raises(ConfigError) as err:
        vlacompile.build(str(built["target"]), checkpoint=tiny_checkpoint_module, episodes=tiny_episodes_module, recipe=str(recipe),
                         out=built["tmp"] / "never", progress=False, closed_loop=False, use_cache=False, log=lambda m: None)
    text = err.value.format()
    assert text.startswith(str(recipe)) and "Hint:" in text, text
    for word in words:
        assert word in text, (word, text)
    assert not (built["tmp"] / "never").exists()


def _report_variant(built, name: str, change) -> Path:
    data = json.loads((built["out"] / "report.json").read_text())
    path = built["tmp"] / f"{name}.json"
    text = change(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("name, change, words", [
    ("other-schema", lambda d: d.update(schema_version="0.3"), ["schema_version", "0.3"]),
    ("no-accuracy", lambda d: d.pop("accuracy"), ["accuracy.nmse_vs_teacher"]),
    ("gates-not-a-list", lambda d: d.update(gates={"gates": {"nmse": "pass"}}), ["gates.gates"]),
    ("truncated", lambda d: json.dumps(d)[:200], ["cannot be read"]),
    ("a-list", lambda d: "[1, 2]", ["not an object"]),
])
def test_a_report_that_compares_nothing_is_refused(built, name, change, words):
    """`report diff` and `build --baseline` against a report.json of another schema compared nothing
    and passed: the schema and the sections a gate compares are checked when the report is read."""
    bad = _report_variant(built, name, change)
    diff = _cli(["report", "diff", str(bad), str(built["out"])])
    _refused(diff, str(bad), *words)
    diff_new = _cli(["report", "diff", str(built["out"]), str(bad)])
    _refused(diff_new, str(bad))
    out = built["tmp"] / f"baseline-{name}"
    base = _cli(["build", *built["common"], "--recipe", str(built["recipe"]), "--out", str(out), "--baseline", str(bad)])
    _refused(base, str(bad), *words)
    assert not out.exists()
    summary = _cli(["report", str(bad)])
    _refused(summary, str(bad))


def _damaged_artifact(built, name: str, damage) -> Path:
    art = built["tmp"] / f"damaged-{name}"
    shutil.rmtree(art, ignore_errors=True)
    shutil.copytree(built["out"], art)
    damage(art)
    return art


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name, damage, file, verbs", [
    ("manifest-without-inputs", lambda a: _edit_json(a / "manifest.json", lambda d: d.pop("inputs")), "manifest.json", ("verify",)),
    ("manifest-without-onnx", lambda a: _edit_json(a / "manifest.json", lambda d: d.pop("onnx")), "manifest.json", ("verify", "engine")),
    ("truncated-manifest", lambda a: (a / "manifest.json").write_text((a / "manifest.json").read_text()[:100]), "manifest.json",
     ("verify", "engine")),
    ("manifest-of-another-schema", lambda a: _edit_json(a / "manifest.json", lambda d: d.update(schema_version="7.0")), "manifest.json",
     ("verify", "engine")),
    ("report-without-student", lambda a: _edit_json(a / "report.json", lambda d: d.pop("student")), "report.json", ("verify", "report")),
    ("truncated-spec", lambda a: (a / "student_spec.json").write_text("{\"family\": "), "student_spec.json", ("verify",)),
    ("missing-graph", lambda a: (a / "student.onnx").unlink(), "student.onnx", ("verify",)),  # engine: after TensorRT's import
])
def test_a_damaged_artifact_is_named_not_a_traceback(built, name, damage, file, verbs):
    """verify on a manifest without a section (KeyError) and engine on a truncated manifest
    (JSONDecodeError) ended in tracebacks with exit 1: artifact.py reads them and names what is wrong."""
    art = _damaged_artifact(built, name, damage)
    for verb in verbs:
        args = {"verify": ["verify", str(art), "--calls", "20", "--quiet"], "engine": ["engine", str(art)], "report": ["report", str(art)]}[verb]
        result = _cli(args)
        _refused(result, str(art), file)


# -- the wrong input blamed -------------------------------------------------------------------


@pytest.mark.parametrize("weights, said, words", [
    (SMOLVLA / "half_expert" / "policy", "pi0", ["\"type\": \"pi0\"", "SmolVLA", "model.vlm_with_expert"]),
    (PI0 / "pi0_two_cams" / "policy", "smolvla", ["\"type\": \"smolvla\"", "pi0", "model.paligemma_with_expert"]),
    (PI0 / "pi0_two_cams" / "policy", "act", ["`act`", "ACT", "model.paligemma_with_expert"]),
])
def test_the_weights_decide_the_family_before_any_family_check(tmp_path, weights, said, words):
    """SmolVLA weights under "type": "pi0" were refused as a lerobot 0.4.x processor pipeline."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(weights, ckpt)
    _edit_json(ckpt / "config.json", lambda d: d.update(type=said))
    result = _cli(["build", "--quiet", "--no-closed-loop", "-c", str(ckpt), "--out", str(tmp_path / "out")])
    _refused(result, str(ckpt / "config.json"), *words)
    assert "0.4" not in result.output and "processor" not in result.output.split("Hint:")[0]


def test_a_still_image_named_mp4_is_not_a_video(tmp_path):
    """A PNG renamed to .mp4 was reported as a video with fewer frames than the parquet."""
    import numpy as np
    from PIL import Image

    from vlacompile.data import read_episodes
    from vlacompile.errors import EpisodeError

    eps = tmp_path / "episodes"
    shutil.copytree(SMOLVLA / "one_cam_cross_every2" / "episodes_video", eps)
    video = next(eps.rglob("*.mp4"))
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "frame.png")
    shutil.copy(tmp_path / "frame.png", video)
    with pytest.raises(EpisodeError) as err:
        read_episodes(eps)  # reads each video's header (size, frame rate) as it reads the dataset
    text = err.value.format()
    assert str(video) in text and "not a video" in text and "fewer frames" not in text and "Hint:" in text


# -- no hint ----------------------------------------------------------------------------------

BAD_RECIPES = {
    "negative-steps": ("steps = 3", "steps = -1", ["distill.steps", "-1"]),
    "string-seed": ('name = "tiny-quick"', 'name = "tiny-quick"\nseed = "0"', ["seed", "'0'"]),
    "string-steps": ("steps = 3", 'steps = "3"', ["steps", "'3'"]),
    "zero-lr": ("steps = 3", "steps = 3\nlr = 0.0", ["distill.lr"]),
    "fraction-over-one": ("layers = { vision = [0], backbone = [1], expert = [0, 1] }", "layers = { vision = 2.0 }", ["distill.layers.vision"]),
    "mlp-ratio": ("steps = 3", "steps = 3\nmlp_ratio = 2.0", ["distill.mlp_ratio"]),
    "jitter-alone": ("steps = 3", "steps = 3\nstate_jitter_copies = 2", ["state_jitter"]),
    "unknown-key": ("steps = 3", "steps = 3\nstpes = 4", ["stpes"]),
    "bad-parallel": ("steps = 3", 'steps = 3\nparallel = "mpi"', ["distill.parallel"]),
    "export-batch": ('stage = "export"', 'stage = "export"\nbatch_size = 0', ["export.batch_size"]),
    "prune-drop": ('[[stages]]\nstage = "export"', '[[stages]]\nstage = "prune"\ndrop_layers = -1\n[[stages]]\nstage = "export"',
                   ["prune.drop_layers"]),
    "quantize-precision": ('stage = "export"', 'stage = "export"\n[[stages]]\nstage = "quantize"\nprecision = "int3"', ["int3"]),
    "closed-loop-zero": ('[[stages]]\nstage = "export"', '[[stages]]\nstage = "export"\n[closed_loop]\nsuite = "reaching"\nepisodes_per_task = 0',
                         ["episodes_per_task"]),
    "closed-loop-no-suite": ('[[stages]]\nstage = "export"', '[[stages]]\nstage = "export"\n[closed_loop]\nepisodes_per_task = 1',
                             ["closed_loop.suite"]),
    "not-toml": ("steps = 3", "steps = = 3", ["not valid TOML"]),
}
BAD_TARGETS = {
    "zero-hz": ("control_hz = 30", "control_hz = 0", ["budget.control_hz"]),
    "zero-actions": ("actions_per_chunk = 8", "actions_per_chunk = 0", ["budget.actions_per_chunk"]),
    "zero-nmse": ("max_nmse = 100.0", "max_nmse = 0.0", ["accuracy.max_nmse"]),
    "string-hz": ("control_hz = 30", 'control_hz = "fast"', ["control_hz", "fast"]),
    "cosine": ("min_cosine = -1.0", "min_cosine = 2.0", ["accuracy.min_cosine"]),
}


@pytest.mark.parametrize("case", [*(f"recipe:{k}" for k in BAD_RECIPES), *(f"target:{k}" for k in BAD_TARGETS),
                                  "recipe:missing-file", "recipe:a-directory", "target:missing-file"])
def test_every_recipe_and_target_error_names_the_file_and_hints(built, case):
    """Eight recipe, target and config errors had no hint (negative steps, 0 Hz, a string seed, a
    missing recipe file, ...)."""
    tmp = built["tmp"]
    kind, name = case.split(":")
    recipe, target = built["recipe"], built["target"]
    words: list[str] = []
    if name == "missing-file":
        path = tmp / f"no-such-{kind}.toml"
    elif name == "a-directory":
        path = tmp / "a-directory.toml"
        path.mkdir(exist_ok=True)
    else:
        old, new, words = (BAD_RECIPES if kind == "recipe" else BAD_TARGETS)[name]
        text = (recipe if kind == "recipe" else target).read_text()
        assert old in text, (old, text)
        path = tmp / f"{kind}-{name}.toml"
        path.write_text(text.replace(old, new, 1))
    if kind == "recipe":
        recipe = path
    else:
        target = path
    common = [a if a != str(built["target"]) else str(target) for a in built["common"]]
    result = _cli(["build", *common, "--recipe", str(recipe), "--out", str(tmp / "never")])
    _refused(result, str(path), *words)
    assert not (tmp / "never").exists()


def test_an_error_raised_without_a_hint_still_ends_with_one():
    for cls in (VlaCompileError, CheckpointError, ConfigError):
        text = cls("something is off", source="somewhere").format()
        assert text.startswith("somewhere: something is off\nHint: ") and len(text.split("Hint: ")[1]) > 10


def test_the_cli_turns_errors_outside_a_verbs_own_try_into_exit_2(monkeypatch, built):
    """The safety net every verb shares: an input error or a path's OSError raised outside a verb's
    own try ends as `error: SOURCE: ...` with a hint and exit 2, not a traceback with exit 1."""
    import vlacompile.report
    import vlacompile.targets

    def broken(report):
        raise ConfigError("a figure is off", source="report.json")

    monkeypatch.setattr(vlacompile.report, "summarize", broken)
    _refused(_cli(["report", str(built["out"])]), "report.json: a figure is off")

    def unreadable():
        raise PermissionError(13, "Permission denied", "/somewhere/targets")

    monkeypatch.setattr(vlacompile.targets, "list_targets", unreadable)
    _refused(_cli(["targets"]), "/somewhere/targets", "Permission denied")


def test_cache_commands_refuse_what_is_not_a_cache_and_prune_only_entries(tmp_path):
    """`cache ls --cache-dir FILE` listed an empty cache; prune deleted any directory in --cache-dir."""
    file = tmp_path / "file"
    file.write_text("x")
    for verb in (["ls"], ["prune", "--all"]):
        _refused(_cli(["cache", *verb, "--cache-dir", str(file)]), str(file), "not a stage cache")
    cache = tmp_path / "cache"
    (cache / "my-checkpoints" / "a").mkdir(parents=True)
    _refused(_cli(["cache", "prune", "--all", "--cache-dir", str(cache)]), str(cache), "my-checkpoints")
    assert (cache / "my-checkpoints" / "a").is_dir()


def test_a_smolvla_tokenizer_with_more_tokens_than_the_embedding_is_refused(tmp_path):
    """SmolVLA's side of the tokenizer check: a SmolVLM2 directory whose tokenizer has more tokens
    than the checkpoint's embedding rows is another model's (the config.json check alone passed it)."""
    import shutil

    from tokenizers import Tokenizer

    from vlacompile.checkpoint import load_policy

    fx = Path(__file__).parent / "families" / "smolvla" / "fixtures" / "one_cam_cross_every2"
    assert load_policy(fx / "policy", tokenizer=fx / "vlm", lerobot_version="0.4").family == "smolvla"
    vlm = tmp_path / "vlm"
    shutil.copytree(fx / "vlm", vlm)
    tok = Tokenizer.from_file(str(vlm / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(5000)])
    tok.save(str(vlm / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="token embedding has") as err:
        load_policy(fx / "policy", tokenizer=vlm, lerobot_version="0.4")
    assert str(vlm) in err.value.format() and "Hint:" in err.value.format()
