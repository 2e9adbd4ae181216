"""The teacher registry: `@register("kind")` on a `Teacher` subclass, `create(spec)` to dispatch on `spec.kind`.

Dispatch lives here; construction (and weight loading) lives in each family's `Teacher.from_spec`. The registry
is open: a family is one module holding its spec class and its registered `Teacher`, either in teachers/kinds/
(all imported with the package) or anywhere else (a manifest's `plugins:` imports it); specs are validated by the
registered class's `spec_cls`, so nothing else lists the kinds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from teachers.spec import TeacherSpecBase

if TYPE_CHECKING:
    import torch

    from teachers.base import Teacher

_TEACHERS: dict[str, type[Teacher]] = {}

T = TypeVar("T", bound="type[Teacher]")


class UnknownTeacherKind(LookupError):
    """`kind` names no registered teacher family."""


def register(kind: str) -> Callable[[T], T]:
    """Class decorator: make `cls` the teacher family for `kind`. Re-registering a kind warns and replaces it."""

    def decorator(cls: T) -> T:
        spec_kind = cls.spec_cls.model_fields["kind"].default
        if spec_kind != kind:
            raise ValueError(f"{cls.__qualname__} is registered as {kind!r} but its spec_cls "
                             f"{cls.spec_cls.__name__} has kind {spec_kind!r}")
        previous = _TEACHERS.get(kind)
        if previous is not None and previous is not cls:
            warnings.warn(f"teacher kind {kind!r} was registered by {previous.__module__}.{previous.__qualname__}; "
                          f"{cls.__module__}.{cls.__qualname__} replaces it", stacklevel=2)
        cls.kind = kind
        _TEACHERS[kind] = cls
        return cls

    return decorator


def known_kinds() -> list[str]:
    """Sorted registered teacher kinds."""
    return sorted(_TEACHERS)


def get_teacher_class(kind: str) -> type[Teacher]:
    """The `Teacher` subclass registered for `kind`; UnknownTeacherKind lists the known ones otherwise."""
    try:
        return _TEACHERS[kind]
    except KeyError:
        raise UnknownTeacherKind(f"unknown teacher kind {kind!r}; known kinds: {', '.join(known_kinds())}") from None


def to_spec(spec: TeacherSpecBase | Mapping[str, Any] | str) -> TeacherSpecBase:
    """Validate a spec given as a spec object, a mapping (`{"kind": ..., ...}`) or a bare kind (all defaults)."""
    if isinstance(spec, TeacherSpecBase):
        get_teacher_class(spec.kind)
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"a teacher spec must be a spec object, a mapping or a kind name, not {type(spec).__name__}")
    return get_teacher_class(str(spec.get("kind"))).spec_cls.model_validate(dict(spec))


def create(spec: TeacherSpecBase | Mapping[str, Any] | str, device: str | torch.device = "cpu") -> Teacher:
    """Build the frozen teacher for `spec` on `device` (loads its weights)."""
    spec = to_spec(spec)
    cls = get_teacher_class(spec.kind)
    if not isinstance(spec, cls.spec_cls):
        raise TypeError(f"teacher kind {spec.kind!r} takes a {cls.spec_cls.__name__}, got {type(spec).__name__}")
    return cls.from_spec(spec, device=device)


def spec_fingerprint(spec: TeacherSpecBase | Mapping[str, Any] | str, *, download: bool = True) -> str:
    """`create(spec).fingerprint` without loading the model: hashes the spec and the files it would read.

    A hub model not yet in the cache is downloaded (its json and safetensors files only), unless `download=False`,
    which raises OSError instead.
    """
    spec = to_spec(spec)
    return get_teacher_class(spec.kind).fingerprint_for(spec, download=download)
