"""Typed, frozen configuration: YAML files plus dotted command-line overrides.

Each stage declares a frozen dataclass (fields documented with ``doc("...")``), e.g.
``pipeline.train.trainer.TrainConfig``. ``load_config(TrainConfig, "configs/train/stage1.yaml",
["optim.lr_per_256=2e-4"])`` builds it, rejecting unknown keys (naming the key and the file) and values of
the wrong type. ``save_config`` writes the resolved config beside an output so every result says
exactly how it was made.

A YAML file may hold ``base: other.yaml`` (relative to itself) to start from another file, and a
field typed as a dataclass may be given as a preset name where the dataclass has ``from_name``
(``model: XL``), or as ``{preset: XL, n_layer: 2}`` to change a preset's fields. A key given
twice in one file is an error (YAML itself would keep the last one silently).

An override's value is read by its field's type: a ``str`` field takes the text as typed
(``prompt=a cat # on a mat``, ``name=2024``, ``out=-``), an optional field reads ``null``, ``~``
or ``None`` as null, and anything else is parsed as YAML (``steps=5``, ``shards=[a,b]``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import re
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


class _Text(str):
    """An override's value as typed on the command line: its field's type decides how to read it."""


_NULL_WORDS = ("null", "Null", "NULL", "~", "None")


def _yaml_value(text: str) -> Any:
    """An override's text read as YAML (``5``, ``2e-4``, ``[a, b]``); the text itself if it is
    no valid YAML."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)


def _plain(value: Any) -> Any:
    """``value`` with every override text in it read as YAML (for fields typed ``Any``/``dict``)."""
    if isinstance(value, _Text):
        return _yaml_value(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """``str``, ``int | None``, ``Literal['md5', 'sha256']`` (the values show), ``list[str]``."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce_text(text: _Text, tp: Any, where: str) -> Any:
    """An override's text for a field of type ``tp``: strings stay as typed, the rest is YAML."""
    if tp is str:
        return str(text)
    if _is_union(tp):
        if type(None) in get_args(tp) and text in _NULL_WORDS:
            return None
        if str in get_args(tp):
            return str(text)
        return _coerce_union(text, tp, where)
    if get_origin(tp) is Literal:
        if text in get_args(tp):
            return str(text)
        try:
            return _coerce(_yaml_value(text), tp, where)
        except ConfigError:  # name what was typed (YAML reads "no" as False)
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {str(text)!r} is not one of {allowed}") from None
    if tp in (int, float):
        # base 10 as typed: YAML 1.1 reads 010 as octal (8) and 1:30 as sexagesimal (90)
        if re.fullmatch(r"[+-]?[0-9]+(?:_[0-9]+)*", text):
            return tp(int(text, 10))
        if ":" in text:
            what = "an integer" if tp is int else "a number"
            raise ConfigError(f"{where}: expected {what}, got {str(text)!r}")
    return _coerce(_yaml_value(text), tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """The first member of the union ``tp`` that takes ``value``; else every member's reason."""
    members = [a for a in get_args(tp) if a is not type(None)]
    nullable = len(members) < len(get_args(tp))
    errors = []
    for arg in members:
        try:
            return _coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) == 1:  # X | None: X's own reason (an unknown key, the allowed values)
        raise ConfigError(f"{errors[0]} (or null)" if nullable else errors[0])
    reasons = "; ".join(e.removeprefix(f"{where}: ") for e in errors)
    raise ConfigError(
        f"{where}: {_plain(value)!r} is not a valid {_type_name(tp)} ({reasons}"
        f"{'; or null' if nullable else ''})"
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert YAML quirks (``1e-4`` as str)."""
    if isinstance(value, _Text):
        return _coerce_text(value, tp, where)
    origin = get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in get_args(tp) and (value is None or value == "None"):  # Python's too
            return None
        return _coerce_union(value, tp, where)
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
            base = _coerce(
                _plain(value["preset"]), tp, _key_where(where, "preset", value["preset"])
            )
            return _build(tp, {**to_dict(base), **rest}, where)
        if (
            isinstance(value, Mapping)
            and "preset" in value
            and "preset" not in {f.name for f in dataclasses.fields(tp)}
        ):
            raise ConfigError(
                f"{where}: {tp.__name__} has no named presets, so {value['preset']!r} cannot "
                "go with keys below it (give its fields, or null alone where it may be null)"
            )
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
        return _plain(dict(value))
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
    return _plain(value)


# the label of the files being read (load_config's), to tell their keys from the overrides'
_ROOT: contextvars.ContextVar[str] = contextvars.ContextVar("config_root", default="")


def _from_command_line(value: Any) -> bool:
    """Whether ``value`` came from the overrides alone (no file gave any part of it)."""
    if isinstance(value, _Text):
        return True
    return (
        isinstance(value, Mapping) and bool(value) and all(map(_from_command_line, value.values()))
    )


def _key_where(where: str, key: str, value: Any) -> str:
    """Where ``key`` under ``where`` was set, for a message: ``FILE: data: batch_size`` for a
    file's key, ``override data.batch_size`` for one the command line gave."""
    if where.startswith("override "):
        return f"{where}.{key}"
    root = _ROOT.get()
    if root and _from_command_line(value) and (where == root or where.startswith(root + ": ")):
        inner = where[len(root) :].removeprefix(": ")
        return "override " + ".".join([*inner.split(": "), key] if inner else [key])
    return f"{where}: {key}"


def _build(cls: type[C], data: Mapping[str, Any], where: str) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        at = _key_where(where, unknown[0], data[unknown[0]])
        at = at if at.startswith("override ") else where
        raise ConfigError(
            f"{at}: unknown key {unknown[0]!r} for {cls.__name__} (known keys: {known})"
        )
    kwargs = {k: _coerce(v, hints[k], _key_where(where, k, v)) for k, v in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:  # all of them at once, not one per try
        more = f" (and {', '.join(repr(m) for m in missing[1:])})" if missing[1:] else ""
        # not blamed on an override: a missing key is what no file and no override gave
        at = where.removeprefix("override ")
        at = f"{_ROOT.get()}: {at}" if at != where and _ROOT.get() else where
        raise ConfigError(f"{at}: missing required key {missing[0]!r}{more} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error."""

    path = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(
                    f"{self.path}, line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    "(YAML would keep only the last one): merge the two"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, path: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.path = path
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(
    path: str, seen: tuple[str, ...] = (), bases: list[str] | None = None
) -> dict[str, Any]:
    """The file's mapping over its ``base`` chain's; ``bases`` collects the chain's files."""
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = _parse_yaml(storage.read_text(path), path) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file") from None
    except (ConnectionError, TimeoutError):  # the storage is down, not the config wrong
        raise
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text (UTF-8) file: {e.reason}") from None
    except ConfigError:
        raise
    except ValueError as e:  # a URI storage would misread (storage.check_uri)
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be one file name (a string), got {base!r}")
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
    else:  # (file://: resolved on the path it names; os.path would lose a slash of the URI)
        base_path = os.path.normpath(os.path.join(os.path.dirname(storage.normalize(path)), base))
    if bases is not None:
        bases.append(base_path)
    return _deep_merge(_read_yaml(base_path, (*seen, path), bases), data)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), str):
            out[k] = {"preset": out[k]}  # "model: XL" plus "model.n_layer=2"
        elif isinstance(v, str) and isinstance(out.get(k), Mapping) and v not in _NULL_WORDS:
            # "model=XL" over a file's "model: {grid_size: 32, ...}" changes the preset and
            # keeps the file's fields (as "model.preset=XL" does), not the whole section
            v = {"preset": v}
        out[k] = (
            _deep_merge(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            else v
        )
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr_per_256=2e-4", "model=L", "model.n_layer=2"]`` -> nested dict of the values'
    text (``{"optim": {"lr_per_256": "2e-4"}, "model": {"preset": "L", "n_layer": "2"}}``),
    which :func:`load_config` reads by each field's type. A preset and a key below it combine,
    in either order."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().lstrip("-").split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key name")
        node = out
        for p in parts[:-1]:
            if p in node and not isinstance(node[p], dict):
                node[p] = {"preset": node[p]}  # "model=L" then "model.n_layer=2"
            node = node.setdefault(p, {})
        if isinstance(node.get(parts[-1]), dict):
            node[parts[-1]]["preset"] = _Text(raw)  # "model.n_layer=2" then "model=L"
        else:
            node[parts[-1]] = _Text(raw)
    return out


def load_config(
    cls: type[C], path: str | None = None, overrides: Sequence[str] = (), **values: Any
) -> C:
    """Build ``cls`` from a YAML file (optional), dotted overrides and keyword values."""
    bases: list[str] = []
    data: dict[str, Any] = _read_yaml(str(path), bases=bases) if path else {}
    given = parse_overrides(overrides)
    _check_shadowed_presets(cls, data, given, str(path))
    data = _deep_merge(data, given)
    data = _deep_merge(data, values)
    # a key of the file or of a base it names: the message names the whole chain
    root = f"{path} (with its base {', '.join(bases)})" if bases else str(path or "<overrides>")
    token = _ROOT.set(root)
    try:
        return _build(cls, data, root)
    finally:
        _ROOT.reset(token)


def _check_shadowed_presets(
    cls: type, file: Mapping[str, Any], given: Mapping[str, Any], path: str
):
    """Refuse a preset given on the command line (``model=XL``) that the file leaves nothing to
    change: the file's keys win, so a saved resolved config (every field spelt out) took
    ``model=XL`` and stayed GPT-B without a word. The preset's fields are those it sets
    otherwise than the file's preset (or the defaults), so ``grid_size: 32`` is not one."""
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for name, hint in hints.items():
        tp, sec, ov = _dataclass_in(hint), file.get(name), given.get(name)
        if isinstance(ov, str) and ov not in _NULL_WORDS:
            ov = {"preset": ov}  # "model=XL" over the file's mapping: as "model.preset=XL"
        if tp is None or not isinstance(sec, Mapping) or not isinstance(ov, Mapping):
            continue
        if "preset" not in ov or not hasattr(tp, "from_name"):
            _check_shadowed_presets(tp, sec, ov, path)
            continue
        try:
            new = tp.from_name(str(_plain(ov["preset"])))
            old = tp.from_name(str(sec["preset"])) if "preset" in sec else tp()
        except Exception:  # noqa: BLE001 - an unknown preset is reported where it is built
            continue
        # the fields this preset change would change; a file that sets some of them keeps its
        # own (``model: {preset: B, n_layer: 5}`` plus ``model=debug``: debug with 5 layers),
        # but one that sets every one of them leaves the override nothing to do
        changed = [k for k in _field_names(tp) if getattr(new, k) != getattr(old, k)]
        shadowed = [
            f"{k}={sec[k]!r} (the preset's {getattr(new, k)!r})"
            for k in changed
            if k in sec and k not in ov and _plain(sec[k]) != getattr(new, k)
        ]
        if shadowed and all(k in sec and k not in ov for k in changed):
            raise ConfigError(
                f"{path}: {name}={_plain(ov['preset'])} on the command line changes nothing: the "
                f"file sets every {name} field that preset sets ({', '.join(shadowed)}), and a "
                "file's field wins over a preset; give them as overrides too, or edit the file"
            )


def _field_names(tp: type) -> list[str]:
    return [f.name for f in dataclasses.fields(tp)]


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-ready) representation of a config."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text (what :func:`save_config` writes)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, uri: str) -> None:
    """Write the resolved config as YAML to ``uri`` (a file path, local or s3://)."""
    storage.write_text(uri, dump_config(cfg))


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (also as ``X | None``), or None."""
    for t in get_args(tp) if _is_union(tp) else (tp,):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe(cls: type, _prefix: str = "", _defaults: Any = None) -> str:
    """One line per field: its dotted name (``optim.lr_per_256``, as an override spells it),
    type, default (or ``required``) and docstring (for ``--show-config``). A nested dataclass's
    fields follow its own line, with the defaults the enclosing field gives them."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, name = hints[f.name], _prefix + f.name
        default = _field_default(f) if _defaults is None else getattr(_defaults, f.name)
        text = f.metadata.get("doc", "")
        indent = "  " * (name.count(".") + 1)
        sub = _dataclass_in(tp)
        if default is dataclasses.MISSING:
            value = " (required)"
        elif sub is not None and default is not None:
            value = ""  # its fields below say
        else:
            value = f" = {default!r}"
        if sub is not None and hasattr(sub, "from_name"):
            text = f"{text} (a preset name, or the fields below with an optional preset)".strip()
        lines.append(f"{indent}{name}: {_type_name(tp)}{value}  {text}".rstrip())
        if sub is not None:
            lines.append(describe(sub, f"{name}.", default if isinstance(default, sub) else None))
    return "\n".join(lines)
