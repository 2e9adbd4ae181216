"""Resumable training checkpoints: `output_dir/checkpoints/step-N/`.

One checkpoint holds, written in this order:
- accelerate `save_state`: `model.safetensors` (the whole student, logit scales included), `optimizer.bin`,
  `scheduler.bin`, `random_states_<rank>.pkl` (python, numpy and torch RNG of every process);
- `data-rank<R>.json`: how many samples each rank has drawn from its epoch order (`pipeline.data.loader.EpochOrder`),
  which is its whole data position, and its counts of text-only and skipped samples;
- `training_provenance.json`: config, store, step and the rows trained on so far, every invocation included (what
  the finished student carries too);
- `trainer_state.json`, last: the step, the sample count and the settings the data position depends on. A
  directory without it is an interrupted save: `resume: auto` ignores it and the next save at that step redoes it.

Resuming = `accelerate.load_state` + each rank's epoch order starting after what it had drawn, so on CPU the losses
after a resume are the losses the uninterrupted run would have logged.

The other kind of checkpoint, a finished student (`output_dir`, `save_pretrained`), is read here too:
`load_student` for the next stage's `model.init_from`, `load_frozen_student` for inference (`pipeline probe`,
`preview`, `generate` and `visualize`), and `training_provenance`, `training_data_config`, `shards_from_checkpoint`
and `checkpoint_max_length` for what its provenance says it was trained on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field

from pipeline.data.errors import UsageError
from student.loading import from_pretrained_safetensors, load_image_processor
from student.model import OlaStudent

CHECKPOINTS_DIR = "checkpoints"
PROVENANCE_FILE = "training_provenance.json"  # in every step-N/ and beside every finished student
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """The loop's position: optimizer steps done, global samples trained on, and this rank's data position: how
    many samples it has drawn from its `pipeline.data.loader.EpochOrder` (used or skipped), plus its running counts."""

    step: int = 0
    samples: int = 0
    batches: int = 0
    drawn: int = 0
    text_only: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def consumed(self, batch: dict) -> None:
        """Record that `batch` (from `student.data.BatchCollator`) was taken from the loader."""
        self.batches += 1
        self.drawn += batch["drawn"]
        if batch["size"]:
            self.text_only += int((~batch["has_image"]).sum())
        for reason, n in batch["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR, f"step-{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir` as (step, path), oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint directory `train.resume` names: 'auto' (newest complete, or None), 'none', or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise UsageError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE}); pass a "
                         f"{CHECKPOINTS_DIR}/step-N directory, 'auto' or 'none'")
    return resume


def save_training_state(accelerator, output_dir: str, state: TrainState, layout: dict, keep: int = 0,
                        files: dict[str, dict] | None = None) -> str:
    """Write a resumable checkpoint of the current step on every rank (collective); returns its directory.

    `layout`: the settings a data position is only valid under (world size, batch size, ...).
    `keep`: keep the newest `keep` complete checkpoints (0 = all).
    `files`: {name: JSON object} the main process writes into the checkpoint before its completion record (the
    run's provenance).
    """
    path = checkpoint_dir(output_dir, state.step)
    if accelerator.is_main_process and os.path.exists(os.path.join(path, STATE_FILE)):
        os.remove(os.path.join(path, STATE_FILE))  # overwriting in place: it is incomplete until rewritten
    accelerator.wait_for_everyone()
    accelerator.save_state(path)
    with open(os.path.join(path, f"data-rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"batches": state.batches, "drawn": state.drawn, "text_only": state.text_only,
                   "skipped": state.skipped}, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, content in (files or {}).items():
            with open(os.path.join(path, name), "w") as f:
                json.dump(content, f, indent=1, sort_keys=True)
        record = {"step": state.step, "samples": state.samples, "layout": layout}
        tmp = os.path.join(path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, STATE_FILE))
        if keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_training_state(accelerator, path: str, layout: dict) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from `path` and return the loop's position (collective)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        record = json.load(f)
    changed = {k: (record["layout"].get(k), v) for k, v in layout.items() if record["layout"].get(k) != v}
    if changed:
        what = ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in changed.items())
        raise UsageError(f"checkpoint {path} cannot resume this run: {what}; restore those settings, or set "
                         "train.resume=none to start over")
    data_file = os.path.join(path, f"data-rank{accelerator.process_index}.json")
    with open(data_file) as f:
        data = json.load(f)
    accelerator.load_state(path)
    return TrainState(step=record["step"], samples=record["samples"], batches=data["batches"], drawn=data["drawn"],
                      text_only=data["text_only"], skipped=data["skipped"])


def load_student(path: str, *, field: str = "checkpoint"):
    """(OlaStudent, tokenizer, image processor) from a `pipeline train` output directory, weights from safetensors.

    The model comes back as `from_pretrained` leaves it (eval mode, gradients on); callers that need it frozen say
    so themselves. `field` names `path` in errors (`model.init_from`, `checkpoint`).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{field}={path} holds no trained student (no config.json); pass the output_dir of "
                         "`pipeline train`")
    hf_logging.disable_progress_bar()
    model = from_pretrained_safetensors(OlaStudent, path, field=field)
    return model, AutoTokenizer.from_pretrained(path), load_image_processor(path)


def load_frozen_student(path: str):
    """(OlaStudent in eval mode without gradients, tokenizer, image processor) from a `pipeline train` output
    directory: `load_student` for inference."""
    model, tokenizer, image_processor = load_student(path)
    model.requires_grad_(False)
    return model.eval(), tokenizer, image_processor


def training_provenance(checkpoint: str) -> dict:
    """The provenance `checkpoint` carries (`training_provenance.json`), or {} if it has none or it is unreadable."""
    try:
        with open(os.path.join(checkpoint, PROVENANCE_FILE)) as f:
            provenance = json.load(f)
    except (OSError, ValueError):
        return {}
    return provenance if isinstance(provenance, dict) else {}


def training_data_config(checkpoint: str) -> dict:
    """The `data` section of the experiment that trained `checkpoint` (its provenance file), or {} if unknown."""
    data = training_provenance(checkpoint).get("config", {})
    data = data.get("data") if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def shards_from_checkpoint(checkpoint: str) -> str:
    """The shards the checkpoint was trained on (its provenance), for when --shards is not given."""
    shards = training_data_config(checkpoint).get("shards")
    if not shards:
        raise UsageError(f"{checkpoint} records no training shards ({PROVENANCE_FILE}); pass --shards")
    return shards


def checkpoint_max_length(checkpoint: str, override: int | None = None) -> int:
    """Text tokens per sample: `override`, else what the checkpoint was trained with, else 96."""
    return int(override or training_data_config(checkpoint).get("max_length") or 96)
