"""What made a checkpoint: the store a run trained on (checked against the experiment first), the config, its
progress and the store rows it trained on. Written as `training_provenance.json` into every resumable `step-N/`
and beside the finished student."""

from __future__ import annotations

import json
import os

from pipeline.data.errors import UsageError
from pipeline.data.fingerprints import check_fingerprint
from pipeline.data.index import row_ranges
from pipeline.data.store import TargetStore
from student.checkpoint import PROVENANCE_FILE, TrainState
from student.config import ExperimentConfig


def check_store(cfg: ExperimentConfig) -> dict:
    """Open the store, check the tasks' teachers exist with the expected fingerprints; return its provenance."""
    store = TargetStore(cfg.data.store)
    info = {"store": store.path, "dataset_fingerprint": store.dataset_fingerprint, "num_rows": store.num_rows,
            "teachers": {}}
    for name in cfg.model.tasks:
        if name not in store.teacher_names():
            raise UsageError(f"store {store.path} has no teacher {name!r} (it has {store.teacher_names()}); "
                             "precompute it or drop the task from model.tasks")
        attrs = store.teacher_attrs(name)
        expected = cfg.data.expected_fingerprints.get(name)
        if expected and not cfg.data.accept_fingerprint_mismatch:
            check_fingerprint(name, attrs["teacher_fingerprint"], expected, where=f"in store {store.path}",
                              expected_by="the experiment (data.expected_fingerprints)",
                              remedy="use the matching store or set data.accept_fingerprint_mismatch=true")
        info["teachers"][name] = {"teacher_fingerprint": attrs["teacher_fingerprint"],
                                  "target_shape": attrs["target_shape"], "dtype": attrs["dtype"],
                                  "complete": attrs.get("complete", False), "spec": attrs.get("spec")}
    return info


def run_provenance(cfg: ExperimentConfig, store_info: dict, accelerator, state: TrainState, loss: dict[str, float],
                   resumed_from: str | None, rows: list[int]) -> dict:
    """The provenance of a checkpoint saved at `state` (`store_info`: from `check_store`)."""
    return {
        "config": cfg.model_dump(mode="json"),
        "store": store_info,
        "steps": state.step,
        "samples": state.samples,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        # The torch threads each rank computed with: on a CPU the last bits of a step depend on them.
        "cpu_threads": state.cpu_threads,
        "resumed_from": resumed_from,
        # The store rows trained on (every rank, every invocation since the first), as [start, stop) ranges: a
        # checkpoint names its data.
        "rows": {"count": len(set(rows)), "ranges": row_ranges(rows)},
        "final_loss": loss,
        "created_by": "teacher-targets-pipeline",
    }


def rows_of(checkpoint: str) -> list[int]:
    """The rows a resumable checkpoint's provenance names ([] for one saved before step provenance existed)."""
    try:
        with open(os.path.join(checkpoint, PROVENANCE_FILE)) as f:
            ranges = json.load(f)["rows"]["ranges"]
    except FileNotFoundError:
        return []
    return [row for start, stop in ranges for row in range(start, stop)]
