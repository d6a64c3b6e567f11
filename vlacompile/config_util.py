"""Strict dataclass <- dict conversion for TOML files: unknown keys and wrong types are errors."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from vlacompile.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("file not found", source=path,
                          hint="check the path; a shipped recipe or target is passed by name, without .toml "
                               "(`vlacompile targets` lists the targets, recipes/ the recipes)") from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a TOML file", source=path, hint="pass the path of the .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid TOML ({e})", source=path, hint="fix the syntax at the position given") from None


def resolve_toml(name_or_path: str | Path, directory: Path, *, what: str, option: str) -> Path:
    """``name`` -> ``directory/name.toml``; a path to a TOML file is taken as it is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(q.stem for q in directory.glob("*.toml")))
        raise ConfigError(
            f"unknown {what} {str(name_or_path)!r}",
            source=option,
            hint=f"known {what}s: {known} (or pass a path to a {what} TOML file)",
        )
    return path


def _in_int64(value: int | float) -> bool:
    # TOML integers are 64-bit; a dict built in Python could hold larger ones, which overflow float().
    return isinstance(value, float) or -(2**63) <= value < 2**63


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; expected one of {list(args)}", source=source)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}", source=source)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, str]
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}", source=source)
            return tuple(_coerce(v, t, f"{where}[{i}]", source) for i, (v, t) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}", source=source)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, where)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _in_int64(value):
            raise ConfigError(f"{where} must be a number, got {value!r}", source=source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _in_int64(value):
            raise ConfigError(f"{where} must be a (64-bit) integer, got {value!r}", source=source)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}", source=source)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}", source=source)
        return value
    return value


def from_dict(cls: type, data: Any, source: str | Path, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; errors name the file and the key path."""
    source = str(source)
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a table, got {data!r}", source=source,
                          hint=f"write it as a TOML table: [{label}] with key = value lines, or {label} = {{ key = value }}")
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - set(flds))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {label}",
            source=source,
            hint=f"allowed keys: {sorted(flds)}",
        )
    kwargs = {}
    for name, f in flds.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            try:
                kwargs[name] = _coerce(data[name], hints[name], key, source)
            except ConfigError as e:  # the type's own message, with the key's default as the example
                if e.hint is not None:
                    raise
                raise ConfigError(e.message, source=e.source, hint=_example(key, f)) from None
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key!r}", source=source,
                              hint=f"add {key.rsplit('.', 1)[-1]} = ... ({_type_name(hints[name])}) to the {label} table")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _example(key: str, f: dataclasses.Field) -> str:
    """A hint for a value of the wrong type: the key's default, written as TOML."""
    import json

    name = key.rsplit(".", 1)[-1]
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if dataclasses.is_dataclass(default):
        default = to_dict(default)
    if default is None or default == {} or default == ():
        return f"see the shipped recipes/*.toml and targets/*.toml for {name}'s form"
    return f"e.g. {name} = {json.dumps(to_dict(default))} (its default)"


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
