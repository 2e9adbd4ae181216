"""Teacher manifests: a YAML file naming a set of teachers, loaded strictly into `TeacherManifest`.

Format::

    teachers:                     # mapping, file order is kept
      depth:                      # teacher name = the store's sub-group name
        kind: depth_anything_v2   # picks the spec class (see teachers.spec)
        model: ${DEMO_DIR:-runs/demo}/assets/teachers/depth
        layers: [0, 1, 2, 3]
    plugins: [my_lab.teachers]    # optional: modules imported first, registering more teacher kinds

Each entry is validated by the spec class its `kind` is registered with (see teachers.registry), so a kind from a
plugin module is named exactly like a built-in one. Ray workers import the same modules when they unpickle the
specs, so a plugin must be importable on every node.

String values may use `${VAR}` or `${VAR:-default}` (the default when VAR is unset or empty); `$${` is a literal
`${`. Relative model paths are relative to the working directory, not to the manifest.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from pipeline.config_io import describe_validation_error, expand_env
from pipeline.errors import UsageError
from pipeline.store import check_teacher_name
from teachers.registry import UnknownTeacherKind, get_teacher_class, known_kinds
from teachers.spec import TeacherSpecBase

# Teacher names become Zarr group names and log keys, so keep them to path-safe characters.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ManifestError(UsageError, ValueError):
    """A manifest that cannot be read or does not validate; the message is one line naming file and field."""


class TeacherManifest(BaseModel):
    """A validated teacher set. `teachers` keeps the file's order; `plugins` are the modules imported first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: dict[str, SerializeAsAny[TeacherSpecBase]] = Field(min_length=1)
    description: str = ""
    plugins: tuple[str, ...] = ()

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


def _import_plugins(plugins: Any) -> None:
    """Import the modules a manifest names, so the teacher kinds they register can be used."""
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ValueError(f"plugins: expected a list of module names, got {plugins!r}")
    for module in plugins:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is the manifest's problem, named
            raise ValueError(f"plugins: cannot import {module!r} ({type(exc).__name__}: {exc})") from None


def _teacher_spec(name: str, entry: Any) -> TeacherSpecBase:
    """One manifest entry validated by its registered kind's spec class; ValueError names the field."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"teachers.{name}: expected a mapping of spec fields, got {type(entry).__name__}")
    known = ", ".join(known_kinds())
    if "kind" not in entry:
        raise ValueError(f"teachers.{name}.kind: missing; set it to one of: {known}")
    try:
        spec_cls = get_teacher_class(str(entry["kind"])).spec_cls
    except UnknownTeacherKind:
        raise ValueError(f"teachers.{name}.kind: unknown kind {entry['kind']!r}; known kinds: {known}") from None
    try:
        return spec_cls.model_validate(dict(entry))
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, prefix=("teachers", name))) from None


def parse_manifest(data: Any, source: str = "<manifest>", environ: Mapping[str, str] | None = None) -> TeacherManifest:
    """Validate already-parsed YAML/JSON data (env vars are expanded first). Errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping with a 'teachers' key, got {type(data).__name__}")
    try:
        data = expand_env(data, environ)
    except UsageError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    try:
        _import_plugins(data.get("plugins", []))
        if isinstance(data.get("teachers"), Mapping):
            problems, specs = [], {}
            for name, entry in data["teachers"].items():
                try:
                    specs[name] = _teacher_spec(name, entry)
                except ValueError as exc:
                    problems.append(str(exc))
            if problems:
                raise ValueError("; ".join(problems))
            data = {**data, "teachers": specs}
    except ValueError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    try:
        return TeacherManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {describe_validation_error(exc)}") from None


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
