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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from pipeline.data.config import describe_validation_error, load_config
from pipeline.data.errors import UsageError
from pipeline.data.store import check_teacher_name
from teachers.registry import UnknownTeacherKind, get_teacher_class, known_kinds
from teachers.spec import TeacherSpecBase

# Teacher names become Zarr group names and log keys, so keep them to path-safe characters.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ManifestError(UsageError, ValueError):
    """A manifest that cannot be read or does not validate; the message is one line naming file and field."""


class TeacherManifest(BaseModel):
    """A validated teacher set. `teachers` keeps the file's order; `plugins` are the modules imported first.

    `TeacherManifest.model_validate(mapping)` (and so `load_config(path, TeacherManifest)`) validates each entry
    by the spec class its `kind` is registered with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: dict[str, SerializeAsAny[TeacherSpecBase]] = Field(min_length=1)
    description: str = ""
    plugins: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _specs_by_kind(cls, data: Any) -> Any:
        # Before field validation: `teachers` is typed by the base class, which would refuse every kind's own
        # fields, and a kind from a plugin is only registered once its module is imported.
        if not isinstance(data, Mapping):
            return data
        _import_plugins(data.get("plugins", ()))
        if not isinstance(data.get("teachers"), Mapping):
            return data
        problems, specs = [], {}
        for name, entry in data["teachers"].items():
            try:
                specs[name] = _teacher_spec(name, entry)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return {**data, "teachers": specs}

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
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        raise ValueError(f"plugins: expected a list of module names, got {plugins!r}")
    for module in plugins:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is the manifest's problem, named
            raise ValueError(f"plugins: cannot import {module!r} ({type(exc).__name__}: {exc})") from None


def _teacher_spec(name: str, entry: Any) -> TeacherSpecBase:
    """One manifest entry validated by its registered kind's spec class; ValueError names the field."""
    if isinstance(entry, TeacherSpecBase):
        return entry
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


def load_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> TeacherManifest:
    """Read a teacher manifest YAML file into a `TeacherManifest` (see the module docstring for the format);
    `environ` replaces os.environ for `${VAR}` expansion. Raises ManifestError, one line naming file and field."""
    try:
        return load_config(path, TeacherManifest, environ=environ)
    except UsageError as exc:
        raise ManifestError(str(exc)) from None
