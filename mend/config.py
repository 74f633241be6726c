"""Configs: frozen dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

There is one config path for every entry point::

    cfg = load_config(PretrainConfig, "configs/pretrain/smollm2.yaml", ["train.lr=5e-5"])

- Unknown keys are errors, with the closest valid key suggested.
- Values are checked against the field's type (``int``, ``float``, ``bool``, ``str``,
  ``Literal[...]`` choices, ``tuple[...]``, ``Optional``, nested dataclasses) when parsed.
- Checks between fields live in each dataclass's ``__post_init__``.

Each config lives beside the code it configures (the model's, :class:`MendConfig`, in
:mod:`mend.core.config`) and is loaded by this one loader.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mend.errors import ConfigError

T = TypeVar("T")

def checked(cls: type[T]) -> type[T]:
    """Make a config dataclass check its fields when built in Python too, not only when read
    from YAML or a checkpoint: every field is checked against its type as :func:`from_dict`
    checks it (``num_placeholders="4"`` is an error, as in YAML; ``lr="5e-5"`` is the float
    YAML would make of it), before the class's own ``__post_init__``. Put it under
    ``@dataclass``, which then calls the check::

        @dataclass(frozen=True)
        @checked
        class MyConfig: ...
    """
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self) -> None:
        for name, tp in _typed_fields(type(self)):
            value = getattr(self, name)
            coerced = _coerce(tp, value, name)
            if coerced is not value:  # a frozen dataclass: set what YAML would have made
                object.__setattr__(self, name, coerced)
        if own is not None:
            own(self)
        else:
            parent = super(cls, self)
            if hasattr(parent, "__post_init__"):
                parent.__post_init__()

    cls.__post_init__ = __post_init__
    return cls


@functools.cache
def _typed_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(name, type)`` of a config class's fields, resolved once per class rather than at
    every instance."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping; unknown keys and bad types are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys, got "
                          f"{type(data).__name__} {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean `{_join(where, close[0])}`?" if close else ""
        raise ConfigError(f"Unknown config key `{_join(where, key)}`.{hint} Valid keys of "
                          f"{cls.__name__}: {', '.join(sorted(fields))}.")
    hints = typing.get_type_hints(cls)
    data = {k: _onto_default(fields[k], v) for k, v in data.items()}
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"Missing required config key(s): "
                          f"{', '.join(_join(where, m) for m in missing)}.")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _onto_default(f: dataclasses.Field, value: Any) -> Any:
    """Keys given for a nested config override that field's own default, not its class's: a
    job whose default held-out text is WikiText-2 keeps it when only ``content.windows`` is
    set."""
    if not isinstance(value, Mapping) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    return merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value



def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config (tuples become lists), fit for YAML and JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=5e-5", "init_from=out/x"]`` -> ``{"train": {"lr": 5e-5}, "init_from": ...}``.

    Values are parsed as YAML, exactly as the same text after ``key:`` in a config file:
    ``true``, ``3``, ``[1, 2]`` and ``null`` get their types, and a double-quoted string reads
    YAML's escapes, so ``'model.demo_sep="\\n\\n"'`` (single quotes for the shell, double
    for YAML) is two newlines. Unquoted, ``demo_sep=\\n\\n`` is four characters, as in YAML;
    a :class:`UserWarning` then says how to quote it.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override `{item}` is not of the form key=value "
                              f"(for example train.lr=5e-5).")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override `{item}` sets a key below `{part}`, which was "
                                  f"already given a value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"Override `{item}`: its value is not valid YAML "
                              f"({str(e).splitlines()[0]}). Quote it (in a shell: "
                              f"'{key}=\"...\"'), or close the bracket or quote it "
                              f"opens.") from None
        if isinstance(value, str) and _ESCAPE.search(value) and raw.lstrip()[:1] not in "\"'":
            warnings.warn(f"Override `{item}`: the value is the {len(value)} characters "
                          f"{value!r}, backslashes included, as YAML reads unquoted text. For "
                          f"escapes such as newlines write {key}=\"{raw.strip()}\" (in a shell: "
                          f"'{key}=\"{raw.strip()}\"').", stacklevel=2)
        node[parts[-1]] = value
    return nested


_ESCAPE = re.compile(r"\\[nt]")


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _reading: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a dict, with its ``base:`` files merged in.

    ``base: ../base/gpt2-large.yaml``, or a list of such paths (relative to the file), names
    files whose keys this one starts from, merged in order; the file's own keys then override
    them, key by key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. The shipped configs are under "
                          f"configs/.")
    if path.resolve() in _reading:
        chain = " -> ".join(str(p) for p in (*_reading, path.resolve()))
        raise ConfigError(f"{path}: its `base:` files lead back to it ({chain}). Remove the "
                          f"loop.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8.") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())} "
                          f"(YAML indents with spaces, never tabs; mend reads plain YAML, "
                          f"no !!python tags).") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys.")
    data = dict(loaded or {})
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `base` must be a config file path or a list of them.")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, read_yaml(path.parent / base, (*_reading, path.resolve())))
    return merge(merged, data)


def config_data(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML file (optional) with dotted overrides applied, not yet checked into a class."""
    data = read_yaml(path) if path is not None else {}
    return merge(data, parse_overrides(overrides))


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (optional), apply dotted overrides, and check it into ``cls``."""
    return from_dict(cls, config_data(path, overrides))


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` with the same key and type checks as loading."""
    return from_dict(type(cfg), merge(to_dict(cfg), changes))


# --------------------------------------------------------------------------------------------


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"`{where}` = {value!r} fits none of its types: {'; '.join(errors)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            words = ("no", "off", "false") if not value else ("yes", "on", "true")
            value = next((w for w in words if w in args), value)
        if value in args:
            return value
        raise ConfigError(f"`{where}` must be one of {', '.join(map(repr, args))}; got {value!r}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"`{where}` must have {len(args)} items, got {len(value)}.")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}.")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{where}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"`{where}` must be an integer, got {value!r}.")
    if tp is float:
        # YAML 1.1 reads `5e-5` (no dot) as a string; accept any string float() accepts.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"`{where}` must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"`{where}` must be a string, got {value!r}.")
    raise ConfigError(f"`{where}`: mend cannot check values of type {tp!r}.")
