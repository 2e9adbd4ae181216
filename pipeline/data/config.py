"""YAML manifests in, validated config objects out.

Strings may hold `${VAR}` or `${VAR:-default}` (expanded from the environment), so one manifest
serves a laptop and a cluster: `model: ${DEMO_DIR:-runs/demo}/assets/teachers/depth`.
`--set a.b=c` overrides are applied to the raw mapping before validation, so they pass the same
checks as the file; their values are parsed as YAML scalars (`3`, `1e-3`, `true`, `[1, 2]`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.data.errors import UsageError

_ENV_PATTERN = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Model = TypeVar("Model", bound=BaseModel)


def expand_env(value: Any, environ: Mapping[str, str] | None = None, _where: str = "") -> Any:
    """Expand `${VAR}` / `${VAR:-default}` in every string inside `value` (dicts and lists recursively).

    The default applies when VAR is unset or empty; `$${` is a literal `${`. Keys are left alone. An
    unset variable without a default raises UsageError naming where it was.
    """
    env = os.environ if environ is None else environ
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name, default = match.group(1), match.group(2)
            found = env.get(name)
            if default is not None:
                return found or default
            if found is not None:
                return found
            raise UsageError(f"{_where or 'value'}: environment variable {name} is not set and has no default "
                             f"(write ${{{name}:-default}} or export {name})")

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{_where}.{k}" if _where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{_where}[{i}]") for i, v in enumerate(value)]
    return value


def describe_validation_error(exc: ValidationError, hidden_loc_parts: frozenset = frozenset(),
                              prefix: tuple = ()) -> str:
    """One line naming each bad field (`data.batch_size: Input should be greater than 0; ...`).

    `hidden_loc_parts` drops location parts users never wrote, such as the tag of a discriminated union; `prefix`
    puts the location of the validated value in front (`("teachers", "depth")` for one manifest entry).
    """
    problems = []
    for error in exc.errors():
        loc = [*prefix, *(p for p in error["loc"] if p not in hidden_loc_parts)]
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; unknown keys are errors, not ignored)"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


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
    """Build a pydantic model; a failure becomes one UsageError line naming the file and each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{source}: {describe_validation_error(exc)}") from None
