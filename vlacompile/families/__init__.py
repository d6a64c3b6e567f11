"""Policy families: where a checkpoint's architecture is recognised and built.

A family turns ``config.json`` into a config object, builds the torch module with the canonical
signature (see ``vlacompile.policy``), and describes it (spec, FLOPs). The reference family is the
first; LeRobot SmolVLA / pi0 and GR00T loaders plug in here by registering a ``Family``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vlacompile.policy import PolicySpec


@dataclass(frozen=True)
class Family:
    name: str
    config_from_dict: Callable[[dict[str, Any], str], Any]  # (config.json contents, source) -> config
    build: Callable[[Any], nn.Module]
    spec_of: Callable[[nn.Module], PolicySpec]
    flops_per_call: Callable[[Any], dict[str, float]]  # {"system2", "system1_per_step", "system1"}


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family | None:
    return _FAMILIES.get(name)


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def _register_builtin() -> None:
    from vlacompile.families import reference

    register(
        Family(
            name=reference.FAMILY,
            config_from_dict=reference.ReferenceConfig.from_dict,
            build=reference.build,
            spec_of=reference.spec_of,
            flops_per_call=reference.flops_per_call,
        )
    )


_register_builtin()
