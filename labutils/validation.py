"""Validated dataclasses that round-trip through JSON: the base of every config in labutils.

Every config (ModelConfig, TrainConfig, RunConfig, Study) subclasses `ConfigBase`: fields are type-checked
at construction, unknown keys are an error (with a did-you-mean), and `validate()` holds the
cross-field rules. No `eval`/`exec` anywhere: a config is data.

Every error labutils raises on purpose is defined here too; each message names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import signal
import types
import typing
from pathlib import Path
from typing import Any, Union


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (or notebook parameter) and the fix."""


class DataError(ValueError):
    """Bad data input: the message names the problem and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or does not fit what loads it."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, busy out_dir); the message says why and what to change."""


class StudyError(RuntimeError):
    """Some runs of a study failed; the finished ones are kept and a re-run resumes the rest."""


class FolderInUseError(RuntimeError):
    """Processes of an earlier run still write into the folder a new run would use; the message names their pids
    and how to stop them."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM or SIGINT) and has ended what it started. A KeyboardInterrupt, so
    code that already treats Ctrl-C as "interrupted, not failed" (a run's summary, Optuna) does the same here."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError naming `field` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def choice(value: str, field: str, options: typing.Iterable[str]) -> None:
    """Check that `value` is one of `options`, suggesting the closest on a typo."""
    options = list(options)
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{field}: unknown option {value!r}; choose one of {options}.{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check `value` against annotation `tp`; allow the lossless conversions JSON needs."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, field)
    if origin is typing.Literal:
        choice(value, field, typing.get_args(tp))
        return value
    if origin in (tuple, list):
        return _coerce_sequence(value, tp, field)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        return _coerce_scalar(value, tp, field)
    if isinstance(tp, type) and issubclass(tp, ConfigBase) and isinstance(value, dict):
        return tp.from_dict(value)  # a nested config read back from JSON
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{field}: expected {_type_name(tp)}, got {value!r}")
    return value


def _coerce_union(value: Any, tp: Any, field: str) -> Any:
    """The first of a union's types that takes `value`; None only where the union allows it."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, field)
        except ConfigError:
            continue  # try the union's next type; the error below names them all
    raise ConfigError(f"{field}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_sequence(value: Any, tp: Any, field: str) -> Any:
    """A list or tuple (JSON gives lists for both), each item checked; a fixed-length tuple's length too."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{field}: expected {len(args)} values, got {len(value)}")
        items = [_coerce(v, a, field) for v, a in zip(value, args, strict=True)]
    else:
        items = [_coerce(v, args[0], field) for v in value] if args else list(value)
    return origin(items)


# the words a scalar type's error uses
_SCALARS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce_scalar(value: Any, tp: type, field: str) -> Any:
    """bool, int, float or str: no bool passes as a number, a whole float becomes an int, an int a float."""
    if isinstance(value, bool) == (tp is bool):  # a bool is no number (Python's bool is an int), a number no bool
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if tp is float and isinstance(value, int):
            return float(value)
        if isinstance(value, tp):
            return value
    raise ConfigError(f"{field}: expected {_SCALARS[tp]}, got {value!r} ({type(value).__name__})")


@dataclasses.dataclass
class ConfigBase:
    """Base for configs: typed fields, `validate()` rules, JSON round trip, unknown keys refused."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; subclasses raise ConfigError via `require`/`choice`."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of field names to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, cls.field_names(), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{cls.__name__}: unknown keys {', '.join(hints)}; valid keys are {cls.field_names()}")
        return cls(**data)

    def replace(self, **overrides: Any):
        """A copy with some fields changed, validated like a fresh config."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{cls.__name__}: config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: {path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value
