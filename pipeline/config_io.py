"""YAML manifests in, validated config objects out.

Strings may hold `${VAR}` or `${VAR:-default}` (expanded from the environment), so one manifest
serves a laptop and a cluster: `model: ${DEMO_DIR:-runs/demo}/assets/teachers/depth`.
`--set a.b=c` overrides are applied to the raw mapping before validation, so they pass the same
checks as the file; their values are parsed as YAML scalars (`3`, `1e-3`, `true`, `[1, 2]`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import UsageError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Model = TypeVar("Model", bound=BaseModel)


def expand_env(value):
    """Expand `${VAR}` / `${VAR:-default}` in every string of a nested YAML value."""
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ and os.environ[name] != "":
                return os.environ[name]
            if default is None:
                raise UsageError(f"environment variable {name} is not set and has no default (${{{name}:-...}})")
            return default

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping with environment expansion; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return expand_env(data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested mapping (new keys are allowed; validation judges them)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=10)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"override {key}: {part} is not a mapping")
            node = child
        node[parts[-1]] = expand_env(yaml.safe_load(raw)) if raw.strip() else ""
    return data


def validate(model: type[Model], data: dict, source: str) -> Model:
    """Build a pydantic model; a failure becomes one UsageError line naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(top level)"
            problems.append(f"{where}: {error['msg']}")
        raise UsageError(f"{source}: " + "; ".join(problems)) from None
