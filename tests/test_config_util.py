"""config_util.from_dict: strict dict -> dataclass conversion for TOML recipes and targets."""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlacompile.config_util import from_dict, read_toml, to_dict
from vlacompile.errors import ConfigError

SRC = "recipe.toml"


@dataclass(frozen=True)
class Inner:
    kind: Literal["a", "b"]
    size: int = 1


@dataclass(frozen=True)
class Outer:
    name: str
    ratio: float
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = ()
    pair: tuple[int, str] = (0, "x")
    limit: float | None = None
    choice: Literal["x", "y"] | None = None
    inner: Inner = field(default_factory=lambda: Inner("a"))
    maybe_inner: Inner | None = None
    inners: tuple[Inner, ...] = ()
    table: dict[str, float] = field(default_factory=dict)


FULL = {
    "name": "n",
    "ratio": 2,
    "flag": True,
    "mode": "slow",
    "sizes": [1, 2, 3],
    "pair": [4, "y"],
    "limit": 0.5,
    "choice": "y",
    "inner": {"kind": "b", "size": 7},
    "maybe_inner": {"kind": "a"},
    "inners": [{"kind": "a"}, {"kind": "b", "size": 2}],
    "table": {"w": 1, "v": 2.5},
}


def test_full_dict():
    obj = from_dict(Outer, FULL, SRC)
    assert obj == Outer(
        name="n",
        ratio=2.0,
        flag=True,
        mode="slow",
        sizes=(1, 2, 3),
        pair=(4, "y"),
        limit=0.5,
        choice="y",
        inner=Inner("b", 7),
        maybe_inner=Inner("a", 1),
        inners=(Inner("a"), Inner("b", 2)),
        table={"w": 1.0, "v": 2.5},
    )
    assert isinstance(obj.ratio, float) and isinstance(obj.sizes, tuple) and isinstance(obj.table["w"], float)
    assert from_dict(Outer, to_dict(obj), SRC) == obj


def test_defaults_and_none():
    obj = from_dict(Outer, {"name": "n", "ratio": 1.5, "limit": None, "maybe_inner": None}, SRC)
    assert obj == Outer(name="n", ratio=1.5)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"ratio": "1.5"}, ["ratio", "number"]),
        ({"ratio": True}, ["ratio", "number"]),  # a bool is not a number here
        ({"ratio": None}, ["ratio"]),  # not Optional
        ({"ratio": 2**70}, ["ratio"]),  # beyond TOML's 64-bit integers; would overflow float()
        ({"flag": 1}, ["flag", "true or false"]),
        ({"name": 3}, ["name", "string"]),
        ({"mode": "medium"}, ["mode", "medium", "fast", "slow"]),
        ({"choice": "z"}, ["choice", "'z'"]),
        ({"sizes": 3}, ["sizes", "list"]),
        ({"sizes": [1, 2.5]}, ["sizes[1]", "integer"]),
        ({"sizes": [1, True]}, ["sizes[1]", "integer"]),
        ({"sizes": [2**63]}, ["sizes[0]", "integer"]),
        ({"pair": [1]}, ["pair", "2 items"]),
        ({"pair": [1, 2]}, ["pair[1]", "string"]),
        ({"limit": "none"}, ["limit", "number"]),
        ({"inner": {"kind": "c"}}, ["inner.kind", "'c'"]),
        ({"inner": {"size": 3}}, ["inner.kind", "missing"]),
        ({"inner": 3}, ["inner", "table"]),
        ({"maybe_inner": {"kind": "a", "size": "big"}}, ["maybe_inner.size", "integer"]),
        ({"inners": [{"kind": "a"}, {"kind": "b", "size": 1.5}]}, ["inners[1].size", "integer"]),
        ({"table": {"w": "x"}}, ["table.w", "number"]),
        ({"table": [1]}, ["table", "table"]),
    ],
)
def test_wrong_values_name_the_key(change, words):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {**FULL, **change}, SRC)
    err = info.value
    assert err.source == SRC
    for word in words:
        assert word in err.message, (word, err.message)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {**FULL, "ratoi": 1.0}, SRC)
    assert "ratoi" in info.value.message and info.value.source == SRC
    assert "ratio" in info.value.hint


def test_unknown_nested_key_names_the_table():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {**FULL, "inner": {"kind": "a", "colour": 1}}, SRC)
    assert "colour" in info.value.message and "inner" in info.value.message
    assert "kind" in info.value.hint and "size" in info.value.hint


def test_non_string_unknown_keys():
    # Dicts built in Python may carry non-string keys; the message must still be a ConfigError.
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {**FULL, 1: "a", "b": 2}, SRC)
    assert "'1'" in info.value.message and "'b'" in info.value.message


def test_missing_required_key():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {"name": "n"}, SRC)
    assert "'ratio'" in info.value.message and "missing" in info.value.message


def test_not_a_table():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, ["name", "n"], SRC)
    assert "Outer" in info.value.message


def test_read_toml_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_toml(tmp_path / "absent.toml")
    assert info.value.source == str(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [1,\n")
    with pytest.raises(ConfigError) as info:
        read_toml(bad)
    assert info.value.source == str(bad) and "TOML" in info.value.message and info.value.hint
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(ConfigError):
        read_toml(binary)


# ---------------------------------------------------------------------------------------------
# Fuzz

int64 = st.integers(-(2**63), 2**63 - 1)
finite = st.floats(allow_nan=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.sampled_from(["a", "b", "fast", "slow", "x", "y"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["kind", "size", "q"]) | st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = [f.name for f in fields(Outer)]


def _conforms(value, tp) -> bool:
    """Whether ``value`` is a well-typed value of annotation ``tp`` (the fuzz's oracle)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if args and args[-1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(v, args[1]) for k, v in value.items())
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        hints = typing.get_type_hints(tp)
        return isinstance(value, tp) and all(_conforms(getattr(value, f.name), hints[f.name]) for f in fields(tp))
    if tp is float:
        return type(value) is float
    if tp is int:
        return type(value) is int and -(2**63) <= value < 2**63
    return type(value) is tp


@st.composite
def mutated_outer(draw) -> dict:
    data = dict(FULL)
    for _ in range(draw(st.integers(1, 5))):
        key = draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=4))
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(json_values)
    return data


@settings(max_examples=400, deadline=None)
@given(data=mutated_outer())
def test_fuzz_from_dict_raises_only_config_error(data):
    try:
        obj = from_dict(Outer, data, SRC)
    except ConfigError as err:
        assert err.source == SRC and err.message
        return
    assert _conforms(obj, Outer), obj


inner_st = st.builds(Inner, kind=st.sampled_from(["a", "b"]), size=int64)
outer_st = st.builds(
    Outer,
    name=st.text(),
    ratio=finite,
    flag=st.booleans(),
    mode=st.sampled_from(["fast", "slow"]),
    sizes=st.lists(int64, max_size=4).map(tuple),
    pair=st.tuples(int64, st.text(max_size=4)),
    limit=st.none() | finite,
    choice=st.none() | st.sampled_from(["x", "y"]),
    inner=inner_st,
    maybe_inner=st.none() | inner_st,
    inners=st.lists(inner_st, max_size=3).map(tuple),
    table=st.dictionaries(st.text(max_size=4), finite, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(obj=outer_st)
def test_fuzz_round_trip(obj):
    assert from_dict(Outer, to_dict(obj), SRC) == obj


def test_non_finite_floats_pass_through():
    # Range checks belong to the consumer (targets.validate rejects nan budgets); from_dict keeps the value.
    obj = from_dict(Outer, {"name": "n", "ratio": float("nan")}, SRC)
    assert math.isnan(obj.ratio)
