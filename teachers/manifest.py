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

from pipeline.config_io import describe_validation_error, expand_env
from pipeline.errors import UsageError
from pipeline.store import check_teacher_name
from teachers.spec import SPEC_CLASSES, TeacherSpec

# Teacher names become Zarr group names and log keys, so keep them to path-safe characters.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_KIND_TAGS = frozenset(cls.model_fields["kind"].default for cls in SPEC_CLASSES)


class ManifestError(UsageError, ValueError):
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
            try:
                check_teacher_name(name)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return teachers


def _format_error(exc: ValidationError) -> str:
    # pydantic puts the union tag into the location (teachers.depth.depth_anything_v2.layers); users never wrote it.
    known = ", ".join(sorted(_KIND_TAGS))
    for err in exc.errors():
        if err["type"] == "union_tag_invalid":
            return f"teachers.{err['loc'][1]}.kind: unknown kind {err['input'].get('kind')!r}; known kinds: {known}"
        if err["type"] == "union_tag_not_found":
            return f"teachers.{err['loc'][1]}.kind: missing; set it to one of: {known}"
    return describe_validation_error(exc, hidden_loc_parts=_KIND_TAGS)


def parse_manifest(data: Any, source: str = "<manifest>", environ: Mapping[str, str] | None = None) -> TeacherManifest:
    """Validate already-parsed YAML/JSON data (env vars are expanded first). Errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping with a 'teachers' key, got {type(data).__name__}")
    try:
        data = expand_env(data, environ)
    except UsageError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    try:
        return TeacherManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {_format_error(exc)}") from None


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
