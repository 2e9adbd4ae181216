"""Teacher manifests: a YAML file naming a set of teachers, loaded strictly into `TeacherManifest`.

Format::

    teachers:                     # mapping, file order is kept
      depth:                      # teacher name = the store's sub-group name
        kind: depth_anything_v2   # picks the spec class (see teachers.spec)
        model: ${DEMO_DIR:-runs/demo}/assets/teachers/depth
        layers: [0, 1, 2, 3]

String values may use `${VAR}` or `${VAR:-default}` (the default when VAR is unset or empty); `$${` is a literal
`${`. Relative model paths are relative to the working directory, not to the manifest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from teachers.spec import SPEC_CLASSES, TeacherSpec

_ENV_PATTERN = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Teacher names become Zarr group names and log keys, so keep them to path-safe characters.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_KIND_TAGS = frozenset(cls.model_fields["kind"].default for cls in SPEC_CLASSES)


class ManifestError(ValueError):
    """A manifest that cannot be read or does not validate; the message is one line naming file and field."""


class TeacherManifest(BaseModel):
    """A validated teacher set. `teachers` keeps the file's order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: dict[str, TeacherSpec] = Field(min_length=1)
    description: str = ""

    @field_validator("teachers")
    @classmethod
    def _check_names(cls, teachers: dict[str, Any]) -> dict[str, Any]:
        for name in teachers:
            if not _NAME_PATTERN.match(name):
                raise ValueError(f"teacher name {name!r} may only use letters, digits, '_', '.', '-'")
        return teachers


def expand_env(value: Any, environ: Mapping[str, str] | None = None, _where: str = "") -> Any:
    """Expand `${VAR}` / `${VAR:-default}` in every string inside `value` (dicts and lists recursively).

    Keys are left alone. An unset variable without a default raises ManifestError naming where it was.
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
            raise ManifestError(f"{_where or 'value'}: environment variable {name} is not set and has no default "
                                f"(write ${{{name}:-default}} or export {name})")

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{_where}.{k}" if _where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{_where}[{i}]") for i, v in enumerate(value)]
    return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # pydantic puts the union tag into the location (teachers.depth.depth_anything_v2.layers); users never
        # wrote that level, so leave it out.
        if i == 2 and loc[0] == "teachers" and item in _KIND_TAGS:
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[")


def _format_error(err: Any) -> str:
    loc = _format_loc(tuple(err["loc"]))
    if err["type"] == "union_tag_invalid":
        known = ", ".join(sorted(_KIND_TAGS))
        return f"{loc}.kind: unknown kind {err['input'].get('kind')!r}; known kinds: {known}"
    if err["type"] == "union_tag_not_found":
        known = ", ".join(sorted(_KIND_TAGS))
        return f"{loc}.kind: missing; set it to one of: {known}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; unknown keys are errors, not ignored)"
    return f"{loc}: {msg}" if loc else msg


def parse_manifest(data: Any, source: str = "<manifest>", environ: Mapping[str, str] | None = None) -> TeacherManifest:
    """Validate already-parsed YAML/JSON data (env vars are expanded first). Errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping with a 'teachers' key, got {type(data).__name__}")
    try:
        data = expand_env(data, environ)
    except ManifestError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    try:
        return TeacherManifest.model_validate(data)
    except ValidationError as exc:
        lines = "; ".join(_format_error(e) for e in exc.errors())
        raise ManifestError(f"{source}: {lines}") from None


def load_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> TeacherManifest:
    """Read a teacher manifest YAML file into a `TeacherManifest` (see the module docstring for the format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read teacher manifest ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_manifest(data, source=str(path), environ=environ)
