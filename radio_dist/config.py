"""Config plumbing shared by every component.

Each component owns a pydantic model (``SourceConfig`` in ``sources``, ``TeacherSpec`` in ``teacher``,
``StoreConfig`` in ``store`` ...). This module holds the strict base class, YAML loading with errors that
name the bad key, and ``key.path=value`` overrides for the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the input and the fix."""


def format_validation_error(err: ValidationError, source: str, what: str = "config") -> str:
    """One line per problem, each naming the key (``a.b.c``), what is wrong and the value found."""
    lines = [f"{source}: invalid {what} ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key '{e['loc'][-1]}' — remove it or fix its spelling")
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            lines.append(f"  - {loc}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def validate(model: type[M], data: Any, source: str) -> M:
    """``model.model_validate(data)`` with a readable error naming ``source`` and every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML job file, or ``env:NAME`` — the YAML text in an environment variable (how `radio-dist submit`
    ships a validated config to a Ray job without touching the working directory)."""
    text: str
    if isinstance(path, str) and path.startswith("env:"):
        name = path[4:]
        if name not in os.environ:
            raise ConfigError(f"config {path}: environment variable {name} is not set")
        p: Path | str = path
        text = os.environ[name]
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist — pass the path of a YAML job file")
        text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _field_default(model: type[BaseModel] | None, name: str) -> tuple[Any, type[BaseModel] | None]:
    """``model``'s default for field ``name`` as plain data (None if it has none) and the model below it."""
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return None, None
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default is not None and field.annotation is not None:
        default = TypeAdapter(field.annotation).dump_python(default, mode="json")
    return default, _model_in(field.annotation)


def _models(annotation: Any) -> set[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {m for arg in get_args(annotation) for m in _models(arg)}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The one config model an annotation holds (``M``, ``M | None``, ``list[M]``); None for a union of models."""
    found = _models(annotation)
    return next(iter(found)) if len(found) == 1 else None


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place.

    With ``model`` (the config model ``data`` is for), a key the data leaves out starts from the model's
    default: ``pipeline.partitions.high=448`` adds a partition to the default ``{low: 224}`` instead of
    replacing it (``pipeline.partitions={high: 448}`` replaces it).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value (e.g. store.shard_size=64)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        node: Any = data
        at: type[BaseModel] | None = model
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a valid index")
                node = node[int(part)]
            else:
                default, sub = _field_default(at, part)
                if node.get(part) is None:  # absent (or null): start from the model's default
                    node[part] = default if isinstance(default, dict | list) else {}
                node, at = node[part], sub
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        value = yaml.safe_load(raw) if raw.strip() else None
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {key} is not a valid index")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_model(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Load ``model`` from an optional YAML file plus overrides; errors name the file and key."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [], model)
    return validate(model, data, str(path) if path is not None else "config")


DEBUG_ENV = "RADIO_DIST_DEBUG"  # set (or `radio-dist --debug`): tracebacks and Ray's own logs on screen too


def debugging() -> bool:
    """Whether the user asked for tracebacks and Ray's own logs (``--debug`` / ``RADIO_DIST_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


CONNECT_TIMEOUT_ENV = "RADIO_DIST_CONNECT_TIMEOUT_S"  # how long to wait for an endpoint (object store, Ray)
DEFAULT_CONNECT_TIMEOUT_S = 20.0


def connect_timeout_s() -> float:
    """The bound on waiting for a service to accept connections (``RADIO_DIST_CONNECT_TIMEOUT_S``, seconds)."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_CONNECT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def wait_for_port(host: str, port: int, bound_s: float) -> OSError | None:
    """Open (and close) a TCP connection to ``host:port`` within ``bound_s`` seconds, retrying once a second (a
    restarting server comes back); None when it connected, else the last error."""
    import socket
    import time

    deadline = time.monotonic() + bound_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                return None
        except OSError as e:
            if time.monotonic() + 1.0 > deadline:
                return e
        time.sleep(1.0)
