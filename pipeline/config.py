"""Typed, frozen configuration: YAML files plus dotted command-line overrides.

Each stage declares a frozen dataclass (fields documented with ``doc("...")``), e.g.
``pipeline.train.trainer.TrainConfig``. ``load_config(TrainConfig, "configs/train/stage1.yaml",
["optim.lr_per_256=2e-4"])`` builds it, rejecting unknown keys (naming the key and the file) and values of
the wrong type. ``save_config`` writes the resolved config beside an output so every result says
exactly how it was made.

A YAML file may hold ``base: other.yaml`` (relative to itself) to start from another file, and a
field typed as a dataclass may be given as a preset name where the dataclass has ``from_name``
(``model: XL``), or as ``{preset: XL, n_layer: 2}`` to change a preset's fields.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from pipeline import storage

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration problem, with the key and the file it came from."""


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with a docstring (``default`` may be a value or a factory via ``kw``)."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return dataclasses.field(metadata={"doc": text}, **kw)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda d=default: type(d)(d), metadata={"doc": text}, **kw
        )
    return dataclasses.field(default=default, metadata={"doc": text}, **kw)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert YAML quirks (``1e-4`` as str)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if type(None) in args and (value is None or value == "None"):  # Python's spelling too
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: take the word
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            named = [a for a in get_args(tp) if isinstance(a, str) and a.lower() in words]
            if len(named) == 1:
                return named[0]
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_name"):
            try:
                return tp.from_name(value)
            except KeyError as e:
                raise ConfigError(f"{where}: {e.args[0]}") from None
        if isinstance(value, Mapping) and "preset" in value and hasattr(tp, "from_name"):
            rest = {k: v for k, v in value.items() if k != "preset"}
            base = _coerce(value["preset"], tp, f"{where}.preset")
            return _build(tp, {**to_dict(base), **rest}, where)
        if isinstance(value, Mapping):
            return _build(tp, value, where)
        raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            )
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[C], data: Mapping[str, Any], where: str) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__} (known keys: {known})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if os.path.isabs(base) or storage.is_remote(base):
        base_path = base
    elif storage.is_remote(path):  # relative to a config on S3: join and resolve ".." by hand
        parts: list[str] = []
        for p in f"{path.rsplit('/', 1)[0]}/{base}".split("/"):
            if p == ".." and parts and parts[-1] not in ("", "s3:"):
                parts.pop()
            elif p != ".":
                parts.append(p)
        base_path = "/".join(parts)
    else:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    return _deep_merge(_read_yaml(base_path, (*seen, path)), data)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), str):
            out[k] = {"preset": out[k]}  # "model: XL" plus "model.n_layer=2"
        out[k] = (
            _deep_merge(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            else v
        )
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr_per_256=2e-4", "data.shards=[a,b]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[C], path: str | None = None, overrides: Sequence[str] = (), **values: Any
) -> C:
    """Build ``cls`` from a YAML file (optional), dotted overrides and keyword values."""
    data: dict[str, Any] = _read_yaml(str(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides))
    data = _deep_merge(data, values)
    return _build(cls, data, str(path) if path else "<overrides>")


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-ready) representation of a config."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, uri: str) -> None:
    """Write the resolved config as YAML to ``uri`` (a file path, local or s3://)."""
    storage.write_text(uri, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type) -> str:
    """One line per field with its type, default and docstring (for ``--help``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
            )
        )
        lines.append(
            f"  {f.name}: {_type_name(hints[f.name])} = {default!r}  {f.metadata.get('doc', '')}"
        )
    return "\n".join(lines)
