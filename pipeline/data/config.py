"""YAML manifests in, validated config objects out: `load_config(path, Model, overrides)`.

Strings may hold `${VAR}` or `${VAR:-default}` (expanded from the environment), so one manifest
serves a laptop and a cluster: `model: ${DEMO_DIR:-runs/demo}/assets/teachers/depth`.
`--set a.b=c` overrides are applied to the raw mapping before validation, so they pass the same
checks as the file; their values are parsed as YAML scalars (`3`, `1e-3`, `true`, `[1, 2]`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
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


def load_config(path: str | os.PathLike, model: type[Model], overrides: Iterable[str] = (),
                environ: Mapping[str, str] | None = None) -> Model:
    """Read the YAML mapping at `path`, apply `a.b=c` overrides, expand `${VAR}` and validate it into `model`.

    Experiments and teacher manifests both load here. Every failure is one UsageError line naming the file and
    each bad field (`exp.yaml: train.lr: Input should be greater than 0`).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}; saved "
                         "as UTF-16 or in a legacy code page?); save it as UTF-8") from None
    data = _parse_yaml(text, source, "fix it there")
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = _apply_overrides(data, overrides)
    try:
        # After the overrides, so that an override can replace a value whose variable is unset here.
        data = expand_env(data, environ)
        return model.model_validate(data)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise UsageError(f"{source}: {describe_validation_error(exc)}") from None


def _parse_yaml(text: str, what: str, fix: str) -> Any:
    """`yaml.safe_load(text)`, or one UsageError line naming `what` (a file, a `--set` item), why, and `fix`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{what}: not valid YAML ({_yaml_problem(exc)}); {fix}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively: a few hundred levels exhaust Python's stack. A manifest
        # needs a handful, so this is a damaged or generated file, not a config.
        raise UsageError(f"{what}: nested too deeply to read (hundreds of levels of brackets or mappings, where a "
                         "config needs a few); is it the file or value you meant?") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what it expected and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None or mark is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
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
        fix = "quote a text value (--set 'key=\"text\"') or write a YAML value such as 10, 1e-3, true or [1, 2]"
        node[parts[-1]] = _parse_yaml(raw, f"--set {item}", fix) if raw.strip() else ""
    return data
