"""The shipped demo: teacher and episodes fit each other, and the teacher solves MT10 in closed loop."""
from __future__ import annotations

import json

import pytest

from vlacompile.checkpoint import load_policy
from vlacompile.data import read_episodes
from vlacompile.pipeline import check_episodes_match
from vlacompile.resources import DEMO_EPISODES, DEMO_TEACHER, RECIPES_DIR

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    return load_policy(DEMO_TEACHER)


def test_demo_teacher_and_episodes_fit_each_other(teacher):
    es = read_episodes(DEMO_EPISODES)
    check_episodes_match(es, teacher.spec, DEMO_EPISODES)
    assert len(es.tasks) == 10 and (DEMO_TEACHER / "model.safetensors").stat().st_size <= 25e6
    # training.json states what the teacher was trained on and how it scored when it was written.
    record = json.loads((DEMO_TEACHER / "training.json").read_text())
    assert record["metrics"]["closed_loop"]["episodes"] >= 100 and record["train_frames"] > 0


def test_demo_teacher_solves_mt10_in_closed_loop(teacher):
    pytest.importorskip("metaworld", reason="Meta-World is the optional [sim] extra; not installed in this environment")
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.recipes import load_recipe
    from vlacompile.sim import suite_for
    from vlacompile.sim.rollout import evaluate
    from vlacompile.targets import load_target

    spec = teacher.spec
    recipe = load_recipe(RECIPES_DIR / "x86-cpu.toml")
    assert recipe.closed_loop is not None and recipe.closed_loop.suite == "metaworld-mt10"
    suite = suite_for("metaworld-mt10", spec)
    # The first evaluation scene of each task, chunked as x86-cpu executes it: a few seconds here.
    result = evaluate(
        TorchRunner(teacher), suite, episodes_per_task=1, seed=recipe.closed_loop.seed,
        actions_per_chunk=load_target("x86-cpu").budget.actions_per_chunk, progress=False,
    )
    # It scored 0.95-0.96 over 100 such scenes when it was trained; 0.7 leaves room for other CPUs.
    assert result["episodes"] == 10 and result["success_rate"] >= 0.7, result["tasks"]


def test_default_build_without_the_sim_extra_stops_before_any_work(monkeypatch, tmp_path):
    import sys

    from click.testing import CliRunner

    from vlacompile.cli import main
    from vlacompile.errors import EXIT_INPUT_ERROR

    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if the [sim] extra were not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "--target", "x86-cpu", "--quiet", "--no-cache", "--out", str(out)])
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "x86-cpu.toml [closed_loop]" in result.output and "vlacompile[sim]" in result.output
    assert "--no-closed-loop" in result.output and "Traceback" not in result.output
    assert not out.exists()
