"""What a run logs while it trains: `output_dir/metrics.jsonl` (one JSON record per logged step) and, through
accelerate's trackers, TensorBoard under `output_dir/tensorboard`. With several processes every number is
averaged or summed over the ranks first, so the main process logs the run's values."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch

from pipeline.data.atomic import atomic_file
from pipeline.data.errors import UsageError
from student.checkpoint import TrainState
from student.config import ExperimentConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def hparams(cfg: ExperimentConfig) -> dict:
    """The config flattened to scalars (`train.lr`: ...), as TensorBoard's hparams accept."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def open_metrics(path: str, resumed_step: int):
    """metrics.jsonl for appending, holding the records up to `resumed_step` (none for a fresh run): those after it
    are from a run that died later.

    A last line that is not a whole record is what a kill in the middle of a write leaves: it is dropped with a
    warning. A damaged line before it is a UsageError naming the file and line. The file is rewritten atomically, so
    a kill now cannot lose the records kept.
    """
    kept = _records_until(path, resumed_step) if resumed_step and os.path.exists(path) else []
    with atomic_file(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def _records_until(path: str, step: int) -> list[str]:
    """The lines of metrics.jsonl at `path` whose record is of `step` or before, each ending in a newline."""
    with open(path) as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, TypeError, KeyError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if number < len(lines):
                raise UsageError(f"{path} line {number} is not a metrics record ({why}); repair or delete that "
                                 "line, then rerun") from None
            print(f"warning: {path} line {number} is cut short ({why}), as a kill in the middle of a write leaves "
                  "it; dropped", file=sys.stderr, flush=True)
            break
        if keep:
            kept.append(line + "\n")
    return kept


def mean_terms(accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """Average the loss terms over `count` micro-batches and (with several processes) over ranks."""
    names = sorted(sums)
    values = torch.tensor([sums[k] / count for k in names], dtype=torch.float64)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
    return dict(zip(names, values.tolist()))


def data_counts(accelerator, state: TrainState, excluded: Counter) -> dict[str, int]:
    """Text-only samples trained on and samples skipped so far (all ranks), and samples the stage left out
    (`excluded`: reason -> count); the reasons are in the run's summary."""
    counts = torch.tensor([state.text_only, sum(state.skipped.values())], dtype=torch.float64)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    # Left out before any read (text-only samples in a stage with targets, duplicates, no text): the same on every
    # rank, since every rank sees the whole index.
    return {"text_only_samples": int(counts[0]), "skipped_samples": int(counts[1]),
            "excluded_samples": sum(excluded.values())}
