"""A simulated accelerator teacher, for benchmarks only (a manifest plugin: `plugins: [benchmarks.simulated_teacher]`).

It runs the real CPU preprocessing of the teacher it imitates (any registered kind, at its real sizes), then a
forward that queues `ms_per_image` per image of device time on a simulated stream (a thread that sleeps, without
holding the GIL) and returns at once, as a CUDA forward does; the host waits for the stream when it needs the
outputs. They are targets of the real shape (fixed random values, which compress like real ones; zeros would
make the write stage unrealistically cheap), finished (checked, summed, encoded) on the simulated device too, so
that only the stored bytes reach the host, as on a real one. It measures how well a pipeline feeds a device of a
given speed on a machine that has none.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

import teachers
from teachers.spec import TeacherSpecBase


class SimulatedAcceleratorSpec(TeacherSpecBase):
    """`imitates`: the spec of the teacher whose preprocessing (and model files, for the fingerprint) are used;
    `target_shape` is required, since no model gives one."""

    kind: Literal["simulated_accelerator"] = "simulated_accelerator"
    imitates: dict[str, Any]
    ms_per_image: float = Field(gt=0)

    @field_validator("imitates")
    @classmethod
    def _check_imitated(cls, imitates: dict[str, Any]) -> dict[str, Any]:
        teachers.to_spec(imitates)
        return imitates


@teachers.register("simulated_accelerator")
class SimulatedAcceleratorTeacher(teachers.Teacher):
    spec_cls = SimulatedAcceleratorSpec
    spec: SimulatedAcceleratorSpec

    @staticmethod
    def _imitated(spec: SimulatedAcceleratorSpec) -> tuple[type, TeacherSpecBase]:
        real = teachers.to_spec(spec.imitates)
        return teachers.get_teacher_class(real.kind), real

    @classmethod
    def locate(cls, spec: SimulatedAcceleratorSpec, *, download: bool = True):
        family, real = cls._imitated(spec)
        return family.locate(real, download=download)

    @classmethod
    def build_preprocessor(cls, spec: SimulatedAcceleratorSpec):
        family, real = cls._imitated(spec)
        return family.build_preprocessor(real)

    def load(self) -> None:
        self.resolve_weights()
        if self.spec.target_shape is None:
            raise ValueError("a simulated accelerator teacher needs target_shape: [T, C]")
        self._target_shape = tuple(self.spec.target_shape)
        generator = torch.Generator().manual_seed(0)
        outputs = torch.randn(self.spec.batch_size, *self._target_shape, generator=generator)
        self.register_buffer("outputs", outputs, persistent=False)
        self._finished: dict = {}

    def normalize(self, batch):
        return batch  # the simulated device does no arithmetic: on a GPU these steps are part of its time

    def finish(self, values, storage):
        """The simulated device finishes its outputs instantly, as it computes them: they are the same fixed values
        on every call, so the real `finish` runs once per batch size and storage and its result is reused. What a
        real device leaves to the host stays per call: waiting for the stream to reach these outputs (`.cpu()`
        does on a GPU) and copying the stored bytes into the block's arrays (`block_stages._place`). On an H100 the
        finishing ops read and write a few MB per row: tens of microseconds, a few percent of the forward (an
        estimate), not simulated."""
        wait_for_stream()
        key = (len(values), storage)
        if key not in self._finished:
            self._finished[key] = super().finish(values, storage)
        return self._finished[key]

    def compute(self, batch) -> torch.Tensor:
        """Queues the forward's device time on the stream and returns at once, as a CUDA forward does: the host
        waits when it needs the outputs (`finish`)."""
        count = len(next(iter(batch.values())) if isinstance(batch, dict) else batch)
        STREAM.submit(time.sleep, self.spec.ms_per_image * count / 1000.0)
        return self.outputs[:count]


# The simulated device of this process, as one CUDA stream: the forwards of every teacher and block run one after
# another in the order they were queued, and waiting for one output waits for all queued before it.
STREAM = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulated-device")


def wait_for_stream() -> None:
    """Return once the simulated device has done everything queued so far (`torch.cuda.synchronize` on a GPU)."""
    STREAM.submit(lambda: None).result()
