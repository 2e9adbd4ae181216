"""The `Teacher` protocol: a frozen, deterministic model that turns RGB images into a target tensor per image.

Life of a teacher::

    t = SomeTeacher.from_spec(spec, device="cpu")   # resolve weights, load, freeze
    batch = t.preprocess(images)                    # list[PIL.Image RGB] -> uint8 [B, 3, H, W] (CPU)
    out = t(batch)                                  # Tensor [B, T, C] float32 on CPU, t.target_shape == (T, C)
    out = t.device_forward(batch)                   # the same before the copy: on t.device, in its compute dtype

Preprocessing is split in two (see `teachers.pixels`). The CPU half is a picklable `Preprocessor` that
`SomeTeacher.build_preprocessor(spec)` builds from config files alone, so CPU-only workers that never hold the
model can run it: `preprocess(images)` is `preprocessor(images)`, compact uint8 pixels after the PIL resizes. The
linear half (rescale, mean/std, compute dtype) runs on the device inside `__call__`, as `normalize(batch)` just
before `compute(batch)`; it gives exactly the float32 pixel_values the CPU used to compute. A floating batch is
taken to be finished pixel_values and only cast, so callers that make their own keep working.

A family subclass sets `spec_cls`, implements `build_preprocessor()`, `load()` (build modules, set
`self._target_shape`) and `compute()`, and registers itself with `@teachers.register("<kind>")`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from pipeline.data.finishing import FinishedBatch, finish
from pipeline.data.store import Storage
from teachers.decoding import TargetDecoder
from teachers.pixels import Batch, Preprocessor
from teachers.spec import TeacherSpecBase

FINGERPRINT_VERSION = b"teacher-fingerprint-v1\n"
_HASH_CHUNK = 1 << 20


def _looks_like_local_path(model: str) -> bool:
    # A hub id is exactly "org/name"; anything else that is not an existing directory is a mistyped path.
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") != 1


@dataclass(frozen=True)
class WeightFiles:
    """The files a teacher reads: `root` (a local directory), `files` relative to it (sorted, posix), and whether
    `root` is the user's own directory (`local`) rather than a hub snapshot."""

    root: Path
    files: tuple[str, ...]
    local: bool


def locate_weights(spec: TeacherSpecBase, weight_folders: Sequence[str] = ("",),
                   config_only: Sequence[str] = (), *, download: bool = True) -> WeightFiles:
    """Find (downloading from the hub if `spec.model` is a repo id not in the cache) the files a teacher reads.

    `weight_folders` hold a model: their `*.json` and `*.safetensors` files count, and one without any
    `.safetensors` file is refused since pickled weights are never loaded. `config_only` folders (an image
    processor's) contribute their `*.json` files only. `*.fp16.*` variants are never loaded, so never counted.
    With `download=False` a hub id must already be in the local cache (OSError otherwise); nothing is fetched.
    """
    local = Path(spec.model).expanduser()
    if local.is_dir():
        if spec.revision is not None:
            raise ValueError(f"spec.revision={spec.revision!r} applies to hub ids only, but model "
                             f"{spec.model} is a local directory; remove revision")
        root, is_local = local.resolve(), True
    elif _looks_like_local_path(spec.model):
        raise FileNotFoundError(f"spec.model: no such directory {spec.model} (and it is not a hub id "
                                f"'org/name'); build it first or fix the path")
    else:
        root, is_local = _download(spec, weight_folders, config_only, download), False
    files: list[str] = []
    for sub, needs_weights in [(w, True) for w in weight_folders] + [(c, False) for c in config_only]:
        folder = root / sub if sub else root
        suffixes = (".json", ".safetensors") if needs_weights else (".json",)
        found = sorted(p for p in folder.glob("*")
                       if p.is_file() and p.suffix in suffixes and ".fp16." not in p.name)
        if needs_weights and not any(p.suffix == ".safetensors" for p in found):
            raise FileNotFoundError(f"spec.model: no .safetensors weights in {folder}; only safetensors are "
                                    f"loaded (convert the checkpoint, or pin a hub revision that has them)")
        if not found:
            raise FileNotFoundError(f"spec.model: no config files in {folder}")
        files.extend(p.relative_to(root).as_posix() for p in found)
    return WeightFiles(root=root, files=tuple(sorted(files)), local=is_local)


def _download(spec: TeacherSpecBase, weight_folders: Sequence[str], config_only: Sequence[str],
              download: bool = True) -> Path:
    from huggingface_hub import snapshot_download

    def pattern(sub: str, ext: str) -> str:
        return f"{sub}/*{ext}" if sub else f"*{ext}"

    patterns = [pattern(sub, ext) for sub in weight_folders for ext in (".json", ".safetensors")]
    patterns += [pattern(sub, ".json") for sub in config_only]
    try:
        return Path(snapshot_download(repo_id=spec.model, revision=spec.revision, allow_patterns=patterns,
                                      ignore_patterns=["*.fp16.*"], local_files_only=not download))
    except Exception as exc:  # the hub client raises many types; one readable line is what the caller needs
        offline = " (HF_HUB_OFFLINE is set: the files must already be in the hub cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
        if not download:
            offline = " (not downloading: the files must already be in the hub cache)"
        where = f"{spec.model}@{spec.revision}" if spec.revision else spec.model
        raise OSError(f"spec.model: cannot get {where} from the hub{offline}: "
                      f"{' '.join(str(exc).split())}") from exc


def fingerprint_of(spec: TeacherSpecBase, weights: WeightFiles) -> str:
    """sha256 hex over the spec (minus non-output fields) and the paths, sizes and bytes of `weights.files`.

    A local `model` path is left out of the hashed spec: the files' contents identify the weights, so the same
    checkpoint copied elsewhere keeps its fingerprint. A hub id (and revision) stays in.
    """
    payload = spec.fingerprint_payload()
    if weights.local:
        payload["model"] = None
    h = hashlib.sha256(FINGERPRINT_VERSION)
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    for rel in weights.files:
        path = weights.root / rel
        h.update(f"\n{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """On a CUDA `device`, allow (or forbid) TF32 in float32 matmuls and cuDNN convolutions for the duration, then
    restore both process-wide flags. Forbidding matters too: torch allows TF32 in cuDNN convolutions by default.
    Elsewhere (CPU, MPS) there is no TF32 and nothing changes."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class TargetShapeMismatch(ValueError):
    """The model gives another per-image target shape than the spec's `target_shape` declares."""

    def __init__(self, spec: TeacherSpecBase, actual: tuple[int, int]) -> None:
        self.declared = tuple(spec.target_shape or ())
        self.actual = tuple(actual)
        super().__init__(f"spec.target_shape={list(self.declared)} but {spec.model} gives [T, C] = "
                         f"{list(self.actual)}; fix the declaration (or remove it) or the other spec fields")


class Teacher(nn.Module):
    """Base class of every teacher family. Frozen: eval mode, no gradients, `train()` is a no-op.

    Attributes:
        spec: the validated, frozen spec it was built from.
        device: where the weights live; inputs are moved there by `__call__`.
        compute_dtype: dtype of weights and floating inputs during the forward pass (`spec.compute_dtype`).
        preprocessor: `build_preprocessor(spec)`, the CPU half of preprocessing (`preprocess` calls it).
    """

    kind: ClassVar[str] = ""
    spec_cls: ClassVar[type[TeacherSpecBase]] = TeacherSpecBase

    def __init__(self, spec: TeacherSpecBase, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if not isinstance(spec, self.spec_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.spec_cls.__name__}, got {type(spec).__name__}")
        self.spec = spec
        self.device = torch.device(device)
        self.compute_dtype: torch.dtype = getattr(torch, spec.compute_dtype)
        self._target_shape: tuple[int, int] | None = None
        self._fingerprint: str | None = None
        self._weights: WeightFiles | None = None
        self.preprocessor: Preprocessor | None = None

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: TeacherSpecBase, device: str | torch.device = "cpu") -> Teacher:
        """Build, load weights, then freeze and move to `device` / `spec.compute_dtype`.

        Raises TargetShapeMismatch when `spec.target_shape` is declared and the model gives another shape.
        """
        teacher = cls(spec, device)
        # First, so that load() may run a probe image through it; it reads config files only.
        teacher.preprocessor = cls.build_preprocessor(spec)
        teacher.load()
        if teacher._target_shape is None:
            raise RuntimeError(f"{cls.__name__}.load() did not set the target shape")
        if spec.target_shape is not None and tuple(spec.target_shape) != tuple(teacher._target_shape):
            raise TargetShapeMismatch(spec, teacher._target_shape)
        if teacher._weights is None:
            raise RuntimeError(f"{cls.__name__}.load() did not call resolve_weights()")
        teacher.requires_grad_(False)
        teacher.to(device=teacher.device, dtype=teacher.compute_dtype)
        teacher.eval()
        return teacher

    def load(self) -> None:
        """Build the modules from `self.spec`, call `resolve_weights`, and set `self._target_shape`."""
        raise NotImplementedError

    def decoder(self) -> TargetDecoder | None:
        """The teacher's own modules that turn embeddings of its target shape into a picture (teachers/decoding.py),
        loaded on this teacher's device; None for a kind that has none."""
        return None

    @classmethod
    def build_preprocessor(cls, spec: TeacherSpecBase) -> Preprocessor:
        """The CPU half of preprocessing for `spec`: a picklable `Preprocessor`, list of RGB PIL images -> uint8
        [B, 3, H, W] (or float32 pixel_values where the split is not exact), with the linear steps in its
        `normalize`. Built from the spec and the config files `locate(spec)` finds, never the weights, so it is cheap
        to build in any process; a hub model not yet in the cache is downloaded first, as by `fingerprint_for`."""
        raise NotImplementedError(f"{cls.__name__} must implement build_preprocessor(spec)")

    @classmethod
    def weight_layout(cls, spec: TeacherSpecBase) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(weight folders, config-only folders) of `spec.model` that this family reads; default: the root."""
        return ("",), ()

    @classmethod
    def locate(cls, spec: TeacherSpecBase, *, download: bool = True) -> WeightFiles:
        """The files a teacher built from `spec` reads (see `locate_weights`); default: `weight_layout(spec)`.

        A family whose `model` field is not a plain hub id or directory (timm's `local-dir:`) overrides this.
        """
        return locate_weights(spec, *cls.weight_layout(spec), download=download)

    @classmethod
    def fingerprint_for(cls, spec: TeacherSpecBase, *, download: bool = True) -> str:
        """The fingerprint a teacher built from `spec` would have, without loading the model."""
        return fingerprint_of(spec, cls.locate(spec, download=download))

    def resolve_weights(self) -> Path:
        """Locate (or download) the files of `weight_layout(spec)`, remember them, return the model root."""
        self._weights = self.locate(self.spec)
        return self._weights.root

    # ---- identity -----------------------------------------------------------------------------------------

    @property
    def target_shape(self) -> tuple[int, int]:
        """(T, C): tokens and channels of one image's target."""
        if self._target_shape is None:
            raise RuntimeError(f"{type(self).__name__} is not loaded; build it with teachers.create(spec)")
        return self._target_shape

    @property
    def weight_files(self) -> tuple[str, ...]:
        """Paths, relative to the model root, of the files the fingerprint covers (sorted)."""
        return self._weights.files if self._weights is not None else ()

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the spec (minus non-output fields) and the weight/config files; see `fingerprint_of`."""
        if self._fingerprint is None:
            if self._weights is None:
                raise RuntimeError(f"{type(self).__name__} is not loaded; build it with teachers.create(spec)")
            self._fingerprint = fingerprint_of(self.spec, self._weights)
        return self._fingerprint

    # ---- running ------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Teacher:
        # Teachers have no training mode: dropout etc. must never switch on, whatever a caller does.
        return super().train(False)

    @staticmethod
    def check_images(images: Sequence[Image.Image]) -> None:
        """Raise ValueError unless `images` is a non-empty list of RGB PIL images."""
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image")
            if image.mode != "RGB":
                raise ValueError(f"images[{i}] has mode {image.mode}; convert to RGB before preprocess")

    def preprocess(self, images: Sequence[Image.Image]) -> Batch:
        """list of RGB PIL images -> batch on CPU for `__call__`: `self.preprocessor(images)`, uint8 [B, 3, H, W]
        (float32 pixel_values for a pipeline that cannot be split exactly)."""
        self.check_images(images)
        return self.preprocessor(images)

    def normalize(self, batch: Batch) -> Batch:
        """The linear steps, on the batch's device: uint8 pixels -> float32 pixel_values (`preprocessor.normalize`,
        which passes a floating batch through) -> `compute_dtype`."""
        batch = self.preprocessor.normalize(batch)

        def cast(x: Any) -> Any:
            return x.to(self.compute_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return {k: cast(v) for k, v in batch.items()} if isinstance(batch, Mapping) else cast(batch)

    def compute(self, batch: Batch) -> torch.Tensor:
        """The family's forward pass on normalised pixel_values on `device` / `compute_dtype`: -> [B, T, C]."""
        raise NotImplementedError

    def _move(self, batch: Batch) -> Batch:
        # Integer tensors (uint8 pixels) travel as they are: 1 byte a value; normalize() converts them there.
        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                dtype = self.compute_dtype if x.is_floating_point() else x.dtype
                return x.to(device=self.device, dtype=dtype)
            return x

        if isinstance(batch, Mapping):
            return {k: move(v) for k, v in batch.items()}
        return move(batch)

    def device_forward(self, batch: Batch) -> torch.Tensor:
        """batch from `preprocess` -> targets [B, T, C] as the forward left them: on `device`, in `compute_dtype`,
        an inference tensor (read it; do not modify it in place). For callers that finish the targets on the device,
        as precompute does (pipeline/block_stages.py); `forward` is this copied to the host.

        On a CUDA device, TF32 is allowed exactly when `spec.tf32` is set (see `tf32_mode`)."""
        with torch.inference_mode(), tf32_mode(self.spec.tf32, self.device):
            out = self.compute(self.normalize(self._move(batch)))
        if out.shape[1:] != self.target_shape:
            raise RuntimeError(f"{type(self).__name__} produced {tuple(out.shape)}, expected [B, *{self.target_shape}]")
        return out

    def finish(self, values: torch.Tensor, storage: Storage) -> FinishedBatch:
        """`device_forward`'s outputs checked, summed and encoded where they lie (pipeline/data/finishing.py
        `finish`): the device's work after the forward, of which only the stored bytes and the sums reach the host.
        The benchmarks' simulated accelerator takes it off the host, as a real device does."""
        return finish(values, storage)

    def forward(self, batch: Batch) -> torch.Tensor:
        """batch from `preprocess` -> targets [B, T, C] float32 on CPU (no autograd history); see `device_forward`."""
        # One copy, made outside inference mode: an ordinary CPU tensor that callers may modify in place.
        return self.device_forward(batch).to(device="cpu", dtype=torch.float32, copy=True)
