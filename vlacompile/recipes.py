"""Recipes (recipes/*.toml): the ordered stages of a build and their parameters.

    name = "x86-cpu"
    [[stages]]
    stage = "distill"
    flow_steps = 1
    ...

A recipe is parsed into each stage's ``Params`` dataclass and checked against the target before any
heavy import or any work: unknown stages or keys, kinds that do not chain (torch -> onnx), and
precisions the target lacks are errors that name the recipe file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlacompile.config_util import from_dict, read_toml, resolve_toml, to_dict
from vlacompile.errors import ConfigError
from vlacompile.resources import RECIPES_DIR
from vlacompile.stages import STAGES


@dataclass(frozen=True)
class StageSpec:
    name: str
    params: Any  # the stage module's Params instance


@dataclass(frozen=True)
class ClosedLoopConfig:
    """Closed-loop evaluation in a simulator (vlacompile/sim), teacher and student on the same seeds."""

    suite: str  # a name in vlacompile.sim.SUITES ("reaching", "metaworld-mt10")
    episodes_per_task: int = 3
    tasks: tuple[str, ...] = ()  # empty: every task of the suite
    max_success_drop: float = 0.05  # gate: student success rate may trail the teacher's by at most this
    seed: int = 1000  # evaluation seeds, apart from the training/split seed: held-out initial states
    # Teacher families the suite is for (empty: every family); a build of another family's teacher
    # skips the closed loop and says so (the demo's Meta-World suite is no test of a user's SmolVLA).
    families: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    stages: tuple[StageSpec, ...]
    seed: int = 0
    path: str = ""
    closed_loop: ClosedLoopConfig | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "stages": [{"stage": s.name, **to_dict(s.params)} for s in self.stages],
            "closed_loop": to_dict(self.closed_loop),
        }


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def parse_recipe(data: dict, source: str | Path) -> Recipe:
    source = str(source)
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a TOML table", source=source, hint="start from a shipped recipe, e.g. recipes/x86-cpu.toml")
    allowed = {"name", "description", "seed", "stages", "closed_loop"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}", source=source, hint=f"a recipe has {sorted(allowed)}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("no [[stages]]", source=source, hint="list the stages in order, e.g. [[stages]] stage = \"export\"")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}", source=source, hint="e.g. seed = 0 (no quotes)")
    stages = []
    for i, raw in enumerate(stages_raw):
        if not isinstance(raw, dict):
            raise ConfigError(f"stages[{i}] must be a table", source=source, hint="write each stage as a [[stages]] table with stage = \"...\"")
        raw = dict(raw)
        name = raw.pop("stage", None)
        if name not in STAGES:
            raise ConfigError(
                f"stages[{i}] names unknown stage {name!r}",
                source=source,
                hint=f"known stages: {', '.join(STAGES)}",
            )
        mod = STAGES[name].load()
        params = from_dict(mod.Params, raw, source, where=f"stages[{i}] ({name})")
        stages.append(StageSpec(name, params))
    closed_loop = None
    if "closed_loop" in data:
        closed_loop = from_dict(ClosedLoopConfig, data["closed_loop"], source, where="closed_loop")
        from vlacompile.sim import SUITES

        if closed_loop.suite not in SUITES:
            raise ConfigError(f"closed_loop.suite {closed_loop.suite!r} is unknown", source=source, hint=f"known suites: {sorted(SUITES)}")
        if closed_loop.episodes_per_task < 1 or not 0 <= closed_loop.max_success_drop <= 1:
            raise ConfigError(
                f"closed_loop needs episodes_per_task >= 1 and max_success_drop in [0, 1], got {closed_loop.episodes_per_task} "
                f"and {closed_loop.max_success_drop}",
                source=source,
                hint="e.g. episodes_per_task = 10, max_success_drop = 0.05",
            )
    return Recipe(
        closed_loop=closed_loop,
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        stages=tuple(stages),
        seed=seed,
        path=source,
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = resolve_toml(name_or_path, RECIPES_DIR, what="recipe", option="--recipe")
    return parse_recipe(read_toml(path), path)


def check_recipe(recipe: Recipe, target) -> None:
    """Legality against the target, before any work: kinds chain, precisions exist on the target."""
    kind = "torch"
    saw_export = False
    for i, s in enumerate(recipe.stages):
        mod = STAGES[s.name].load()
        # Legality first: "the target has no FP8" is what the user needs to hear, not a kind mismatch.
        if hasattr(mod, "check"):
            mod.check(s.params, target, source=recipe.path or recipe.name)
        consumes, produces = mod.kinds(s.params, target)
        if consumes != kind:
            raise ConfigError(
                f"stages[{i}] ({s.name}) needs a {consumes} model but gets a {kind} one at that point",
                source=recipe.path or recipe.name,
                hint="order the stages so torch stages (distill, prune, modelopt quantize) come before export, "
                "and ONNX Runtime quantize after it",
            )
        kind = produces
        saw_export = saw_export or s.name == "export"
    if not saw_export:
        raise ConfigError("the recipe has no export stage", source=recipe.path or recipe.name, hint="add [[stages]] stage = \"export\"")


def check_recipe_teacher(recipe: Recipe, teacher) -> None:
    """What can be checked only once the teacher is loaded (a distill.student against its chunk and
    family), still before any work: each stage's optional ``check_teacher(params, teacher, source)``."""
    for s in recipe.stages:
        mod = STAGES[s.name].load()
        if hasattr(mod, "check_teacher"):
            mod.check_teacher(s.params, teacher, source=recipe.path or recipe.name)
