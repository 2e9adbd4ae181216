"""What `pipeline teachers list` and `pipeline teachers show MANIFEST` print.

    from teachers.describe import list_kinds, show_manifest
    print(list_kinds())                                        # every registered kind, its fields and defaults
    print(show_manifest("manifests/teachers/olavlm.yaml"))     # per teacher: spec, shape, fingerprint, size

`show` never downloads (unless asked): a teacher whose weights are not on this machine is reported as such, with
the target shape its spec declares (`target_shape`), and the rest of the manifest is still described. A teacher
whose weights are here is loaded on the CPU, so the shape, fingerprint and parameter count it reports are the
real ones, and the declaration is checked against them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic_core import PydanticUndefined

from pipeline.data.errors import UsageError
from pipeline.data.store import SCALE_DTYPE
from teachers.base import fingerprint_of
from teachers.manifest import load_manifest
from teachers.registry import create, get_teacher_class, known_kinds
from teachers.spec import NON_OUTPUT_FIELDS, TeacherSpecBase

_COMMON_FIELDS = tuple(name for name in TeacherSpecBase.model_fields if name not in ("kind", "model"))


# ---- teachers list ------------------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    """A short, YAML-minded name for a field's type: `int`, `list[int]`, `rgb | bgr`, `int | null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        return f"[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(info: Any) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "(required)"
    value = info.get_default(call_default_factory=True)
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def kind_table() -> list[dict[str, Any]]:
    """Per registered kind: `kind`, `description` (first docstring line of its spec class), `fields` (name, type,
    default, fingerprinted) for `model` and the fields that kind adds or changes, and `common` (the shared fields)."""
    base = TeacherSpecBase.model_fields
    rows = []
    for kind in known_kinds():
        spec_cls = get_teacher_class(kind).spec_cls
        doc = (spec_cls.__doc__ or get_teacher_class(kind).__doc__ or "").strip()
        fields = []
        for name, info in spec_cls.model_fields.items():
            if name == "kind":
                continue
            own = name == "model" or name not in base or _default_text(info) != _default_text(base[name])
            fields.append({"name": name, "type": _type_name(info.annotation), "default": _default_text(info),
                           "fingerprinted": name not in NON_OUTPUT_FIELDS, "common": not own})
        rows.append({"kind": kind, "description": doc.splitlines()[0] if doc else "",
                     "fields": [f for f in fields if not f["common"]],
                     "common": [f for f in fields if f["common"]]})
    return rows


def list_kinds() -> str:
    """Text for `pipeline teachers list`: each kind, a one-line description and its fields with defaults."""
    table = kind_table()
    lines = []
    for row in table:
        lines.append(f"{row['kind']}: {row['description']}")
        width = max(len(f["name"]) for f in row["fields"])
        for f in row["fields"]:
            lines.append(f"    {f['name']:<{width}}  {f['type']} = {f['default']}")
        lines.append("")
    common = table[0]["common"] if table else []
    if common:
        lines.append("every kind also takes:")
        width = max(len(f["name"]) for f in common)
        for f in common:
            note = "" if f["fingerprinted"] else "   (not in the fingerprint)"
            lines.append(f"    {f['name']:<{width}}  {f['type']} = {f['default']}{note}")
    return "\n".join(lines).rstrip() + "\n"


# ---- teachers show ------------------------------------------------------------------------------------------------

@dataclass
class TeacherReport:
    """What `show` found out about one teacher of a manifest. Shapes are [T, C]; `None` means unknown."""

    name: str
    kind: str
    spec: dict[str, Any]
    declared_shape: list[int] | None
    target_shape: list[int] | None = None      # the model's when loaded, else the declared one
    shape_checked: bool = False                # target_shape came from the loaded model
    weights_available: bool = False
    weights_note: str = ""                     # why not, when not
    fingerprint: str | None = None
    num_parameters: int | None = None
    storage: dict[str, Any] = field(default_factory=dict)   # the spec's storage: dtype, quantize, pool
    stored_shape: list[int] | None = None      # [T', C] as stored (T' = T / pool^2)
    bytes_per_row: int | None = None           # what the store writes per row, uncompressed (Storage.row_nbytes)
    problems: list[str] = field(default_factory=list)   # a load failure or a declaration that does not match

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_teacher(name: str, spec: TeacherSpecBase, *, download: bool = False, load: bool = True) -> TeacherReport:
    """Report on one teacher. Looks for its weights (downloading only if `download`), fingerprints them, and, if
    `load`, builds the model on the CPU to read its real target shape and parameter count. Never raises for a
    teacher that cannot be built: the reason goes into `weights_note` or `problems`."""
    declared = list(spec.target_shape) if spec.target_shape is not None else None
    report = TeacherReport(name=name, kind=spec.kind, spec=spec.model_dump(mode="json"), declared_shape=declared,
                           target_shape=declared, storage=asdict(spec.storage()))
    cls = get_teacher_class(spec.kind)
    try:
        weights = cls.locate(spec, download=download)
    except OSError as exc:  # FileNotFoundError included: a missing folder, an uncached hub id, no safetensors
        report.weights_note = _one_line(exc)
    except ValueError as exc:  # the spec cannot name any weights (e.g. an unknown timm model name)
        report.problems.append(_one_line(exc))
    else:
        report.weights_available = True
        report.fingerprint = fingerprint_of(spec, weights)
        if load:
            _load_and_check(report, spec)
    if report.target_shape is not None:
        storage = spec.storage()
        try:
            report.stored_shape = list(storage.stored_shape(*report.target_shape))
            report.bytes_per_row = storage.row_nbytes(*report.target_shape)
        except UsageError as exc:  # a pool that does not fit the shape
            report.problems.append(f"teachers.{name}.pool: {_one_line(exc)}")
    return report


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bars in the middle of `show`'s report."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _load_and_check(report: TeacherReport, spec: TeacherSpecBase) -> None:
    # Built without the declaration, so a mismatch can be reported next to the real shape instead of raised.
    try:
        with _quiet_transformers():
            teacher = create(spec.model_copy(update={"target_shape": None}), device="cpu")
    except Exception as exc:  # any family's load error; `show` describes it rather than stopping
        report.problems.append(f"cannot load: {_one_line(exc)}")
        return
    try:
        report.target_shape = list(teacher.target_shape)
        report.shape_checked = True
        report.num_parameters = sum(p.numel() for p in teacher.parameters())
        if report.fingerprint != teacher.fingerprint:  # the files changed between the two reads
            report.fingerprint = teacher.fingerprint
    finally:
        del teacher
        gc.collect()
    if report.declared_shape is not None and report.declared_shape != report.target_shape:
        report.problems.append(f"teachers.{report.name}.target_shape declares {report.declared_shape} but the "
                               f"model gives {report.target_shape}; fix the declaration")


def describe_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *,
                      download: bool = False, load: bool = True) -> tuple[str, list[TeacherReport]]:
    """(manifest description, one report per teacher in file order). ManifestError for an invalid manifest."""
    manifest = load_manifest(path, environ=environ)
    reports = [describe_teacher(name, spec, download=download, load=load)
               for name, spec in manifest.teachers.items()]
    return manifest.description, reports


def format_report(report: TeacherReport) -> str:
    """The text block `show` prints for one teacher."""
    lines = [f"{report.name} ({report.kind})", "  spec:"]
    width = max(len(k) for k in report.spec)
    # The fields that make this kind what it is first, the shared ones after.
    keys = sorted((k for k in report.spec if k != "kind"), key=lambda k: (k != "model", k in _COMMON_FIELDS))
    for key in keys:
        lines.append(f"    {key:<{width}}  {json.dumps(report.spec[key])}")
    if report.target_shape is None:
        shape = "unknown (declare target_shape: [T, C] in the manifest, or make the weights available)"
    elif report.shape_checked and report.declared_shape is None:
        shape = f"{report.target_shape} (from the model)"
    elif report.shape_checked and report.declared_shape == report.target_shape:
        shape = f"{report.target_shape} (from the model; matches the declared target_shape)"
    elif report.shape_checked:
        shape = f"{report.target_shape} (from the model; the manifest declares {report.declared_shape}: MISMATCH)"
    else:
        shape = f"{report.target_shape} (declared in the manifest; not checked against the model)"
    lines.append(f"  target shape: {shape}")
    if report.weights_available:
        lines.append("  weights:      available locally")
    elif report.weights_note:
        lines.append("  weights:      NOT available locally; the fingerprint and the parameter count need them")
        lines.append(f"                ({report.weights_note})")
    else:
        lines.append("  weights:      not looked for (see the problem below)")
    need = "unknown: needs the weights" if not report.weights_available else "unknown: the model did not load"
    lines.append(f"  fingerprint:  {report.fingerprint or need}")
    params = f"{report.num_parameters:,}" if report.num_parameters is not None else need
    lines.append(f"  parameters:   {params}")
    if report.bytes_per_row is not None:
        lines.append(f"  stored row:   {report.bytes_per_row:,} bytes ({_stored_layout(report)}, before compression)")
    elif report.target_shape is None:
        lines.append("  stored row:   unknown (needs the target shape)")
    else:
        lines.append("  stored row:   unknown (the storage does not fit the target shape; see the problem below)")
    for problem in report.problems:
        lines.append(f"  PROBLEM:      {problem}")
    return "\n".join(lines)


def _stored_layout(report: TeacherReport) -> str:
    """`576 x 1024 float16`, `144 x 1024 int8 + 144 float16 scales, pooled 2 x 2 from 576 tokens`."""
    (t, c), (stored_t, _) = report.target_shape, report.stored_shape
    storage = report.storage
    if storage["quantize"] == "int8":
        text = f"{stored_t} x {c} int8 + {stored_t} {SCALE_DTYPE.name} scales"
    else:
        text = f"{stored_t} x {c} {storage['dtype']}"
    if storage["pool"] > 1:
        text += f", pooled {storage['pool']} x {storage['pool']} from {t} tokens"
    return text


def format_manifest(path: str | os.PathLike[str], description: str, reports: list[TeacherReport]) -> str:
    """The whole text of `show` for reports already made by `describe_manifest`."""
    header = f"{path}: {len(reports)} teacher(s)" + (f" - {description}" if description else "")
    blocks = [header] + [format_report(r) for r in reports]
    row_bytes = [r.bytes_per_row for r in reports]
    if all(b is not None for b in row_bytes):
        blocks.append(f"all teachers: {sum(row_bytes):,} bytes per image before compression")
    return "\n\n".join(blocks) + "\n"


def show_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *,
                  download: bool = False, load: bool = True) -> str:
    """Text for `pipeline teachers show MANIFEST` (see `describe_manifest` for the arguments)."""
    description, reports = describe_manifest(path, environ, download=download, load=load)
    return format_manifest(path, description, reports)
