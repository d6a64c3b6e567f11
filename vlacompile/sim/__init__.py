"""Closed-loop evaluation suites: a policy drives a simulator, and the task either succeeds or not.

A suite is a set of language-conditioned tasks over one gymnasium-style environment family:

    suite = get_suite("reaching", cameras=("front", "wrist"), image_size=64)
    env = suite.make_env(suite.tasks[0])
    obs, info = env.reset(seed=123)          # obs: {"images": {cam: HxWx3 uint8}, "state": f32 [S], "task": str}
    obs, reward, terminated, truncated, info = env.step(action)   # info["success"]: bool

``vlacompile.sim.rollout.evaluate`` runs a runner (teacher or compiled student) through a suite with
action chunking as the target executes it. Suites import their simulator only when built, so this
package stays importable without MuJoCo.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from vlacompile.errors import ConfigError


@runtime_checkable
class Env(Protocol):
    """The gymnasium ``Env`` API, with observations in vlacompile's ``Observation`` layout."""

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]: ...

    def step(self, action) -> tuple[dict, float, bool, bool, dict]: ...


@runtime_checkable
class Suite(Protocol):
    name: str
    tasks: list[str]  # language instructions, one environment configuration each
    cameras: tuple[str, ...]  # camera names in every observation's "images"
    image_size: int
    state_dim: int
    action_dim: int
    max_steps: int  # an episode that has not succeeded after this many steps fails

    def make_env(self, task: str) -> Env: ...


def _reaching(**kwargs: Any) -> Suite:
    from vlacompile.sim.reaching import ReachingSuite

    return ReachingSuite(**kwargs)


def _metaworld_mt10(**kwargs: Any) -> Suite:
    from vlacompile.sim.metaworld import MetaWorldSuite

    return MetaWorldSuite(**kwargs)


SUITES: dict[str, Callable[..., Suite]] = {
    "reaching": _reaching,
    "metaworld-mt10": _metaworld_mt10,
}


def get_suite(name: str, **kwargs: Any) -> Suite:
    """The suite registered as ``name``, built with ``kwargs`` (cameras, image_size, max_steps, ...)."""
    factory = SUITES.get(name)
    if factory is None:
        raise ConfigError(f"unknown simulation suite {name!r}", source="suite", hint=f"known suites: {sorted(SUITES)}")
    return factory(**kwargs)


def suite_for(name: str, spec, **kwargs: Any) -> Suite:
    """The suite ``name`` rendering what the policy ``spec`` reads: its camera names, at its image size."""
    return get_suite(name, cameras=tuple(c.name for c in spec.cameras), image_size=spec.cameras[0].height, **kwargs)


__all__ = ["Env", "Suite", "SUITES", "get_suite", "suite_for"]
