"""Online targets: compute, while training, the targets `pipeline precompute` stored, with the same teachers.

`data.online_teachers: true` (`pipeline train --online-teachers`) is the A/B twin of training on a store: every
teacher is rebuilt from the spec the store recorded for it (`STORE/<teacher>/` attribute `spec`), must have the
store's `teacher_fingerprint`, and its outputs go through the teacher's own storage encoding (float16, bfloat16,
int8, pooling) and back, so a cached and an online run see the same numbers up to that rounding. Samples are still
aligned with the store's `index.parquet` (rows, image hashes); only the target arrays are never read.

Where the teachers run: here, in the training process, on the whole batch, on the training device. Not in the
DataLoader workers, because there every worker would hold its own copy of every teacher (peak memory x
num_workers, and the paper's three teachers hold ~1.2 B parameters), CUDA cannot be used from forked workers, and
a worker would run each teacher on a handful of images on the CPU. One copy per rank, batched on the accelerator,
is what the reference does at every step, so this mode also measures what precomputing saves.

The student's trainer never imports this module (nor `teachers`): `pipeline train` builds the teachers' factory
here (`online_targets_factory`) and hands it to `student.trainer.train`. `teachers` itself is imported only when
a factory builds its teachers, so cached training never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.block_stages import run_teacher
from pipeline.data.errors import UsageError
from pipeline.data.fingerprints import check_fingerprint
from pipeline.data.store import Storage, TargetStore
from student.config import ExperimentConfig


class OnlineTargets:
    """The store's teachers, rebuilt from their recorded specs: `images -> (targets, valid)` like a cached batch."""

    def __init__(self, store_path: str, names: Sequence[str], *, device: str | torch.device = "cpu",
                 accept_fingerprint_mismatch: bool = False):
        import teachers

        store = TargetStore(store_path)
        self.names = list(names)
        self.teachers = {}
        self.storage: dict[str, Storage] = {}
        self.target_shapes: dict[str, tuple[int, int]] = {}
        self.fingerprints: dict[str, str] = {}
        for name in self.names:
            attrs = store.teacher_attrs(name)
            try:
                teacher = teachers.create(attrs["spec"], device=device)
            except (OSError, ValueError, LookupError) as exc:
                raise UsageError(
                    f"cannot build teacher {name!r} from the spec store {store.path} recorded "
                    f"(model {attrs['spec'].get('model')}): {' '.join(str(exc).split())}; online teachers need the "
                    "same weights at the same place as the precompute that wrote the store"
                ) from None
            if not accept_fingerprint_mismatch:
                check_fingerprint(
                    name, teacher.fingerprint, attrs["teacher_fingerprint"],
                    where=f"rebuilt from store {store.path}'s spec", expected_by="the store",
                    remedy=f"the weights at {attrs['spec'].get('model')} or the teacher code changed since the "
                    "precompute; restore them, precompute a new store, or set data.accept_fingerprint_mismatch=true")
            if tuple(teacher.target_shape) != tuple(attrs["target_shape"]):
                raise UsageError(f"teacher {name!r} gives targets {list(teacher.target_shape)} but store "
                                 f"{store.path} holds {attrs['target_shape']}")
            self.teachers[name] = teacher
            self.storage[name] = store.storage(name)
            self.target_shapes[name] = tuple(teacher.target_shape)
            self.fingerprints[name] = teacher.fingerprint

    def __call__(self, images: Sequence) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """RGB PIL images (decoded by `pipeline.data.images.decode_rgb`) -> ({teacher: [B, T, C] float32},
        {teacher: [B] bool}), rounded as the store rounds them; a failed or non-finite row is 0 and invalid, as in
        the store (precompute's batching and failure rules: `run_teacher`)."""
        targets, valid = {}, {}
        for name in self.names:
            out = run_teacher(self.teachers[name], list(images), self.storage[name])
            decoded = self.storage[name].decode(out.stored, out.scale, self.target_shapes[name][0])
            targets[name] = torch.from_numpy(np.ascontiguousarray(decoded))
            valid[name] = torch.from_numpy(out.valid.astype(bool))
        return targets, valid


def online_targets_factory(cfg: ExperimentConfig) -> Callable[[torch.device], OnlineTargets] | None:
    """For `student.trainer.train(cfg, online_targets=...)`: with `cfg.data.online_teachers`, a function that
    builds the store's teachers of `cfg.model.tasks` on a device (each training process calls it once); else None."""
    if not cfg.data.online_teachers:
        return None

    def build(device: torch.device) -> OnlineTargets:
        return OnlineTargets(cfg.data.store, list(cfg.model.tasks), device=device,
                             accept_fingerprint_mismatch=cfg.data.accept_fingerprint_mismatch)

    return build
