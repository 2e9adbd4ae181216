"""Resumable training checkpoints: `output_dir/checkpoints/step-N/`.

One checkpoint holds, written in this order:
- accelerate `save_state`: `model.safetensors` (the whole student, logit scales included), `optimizer.bin`,
  `scheduler.bin`, `random_states_<rank>.pkl` (python, numpy and torch RNG of every process);
- `data-rank<R>.json`: how many samples each rank has drawn from its epoch order (`pipeline.data.loader.EpochOrder`),
  which is its whole data position, and its counts of text-only and skipped samples;
- `training_provenance.json`: config, store, step and the rows trained on so far, every invocation included (what
  the finished student carries too);
- `trainer_state.json`, last: the step, the sample count, torch's intra-op CPU thread count and the settings the
  data position depends on. A directory without it is an interrupted save: `resume: auto` ignores it and the next
  save at that step redoes it.

Resuming = `accelerate.load_state` + each rank's epoch order starting after what it had drawn + the run's CPU thread
count, so on CPU the losses after a resume are the losses the uninterrupted run would have logged. A complete
checkpoint can still fail to load (a file cut short by a full disk or an interrupted copy): `resume: auto` then warns,
naming the file, and resumes from the checkpoint before it (`resume_training_state`).

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
import sys
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.data.atomic import atomic_file
from pipeline.data.errors import UsageError
from student.loading import from_pretrained_safetensors, load_image_processor
from student.model import OlaStudent

if TYPE_CHECKING:  # a type only: loading a finished student (generate, visualize) needs no data loader
    from student.data import Batch

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
    # torch's intra-op CPU threads the run computes with: a resumed run takes them over (see student/trainer.py).
    cpu_threads: int | None = None

    def consumed(self, batch: Batch) -> None:
        """Record that `batch` was taken from the loader."""
        self.batches += 1
        self.drawn += batch.drawn
        if batch.size:
            self.text_only += int((~batch.has_image).sum())
        for reason, n in batch.skipped.items():
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
        record = {"step": state.step, "samples": state.samples, "cpu_threads": state.cpu_threads, "layout": layout}
        with atomic_file(os.path.join(path, STATE_FILE), "w") as f:  # the checkpoint's completion record, last
            json.dump(record, f, indent=1, sort_keys=True)
        if keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


class UnloadableCheckpoint(UsageError):
    """A complete checkpoint (it has its `trainer_state.json`) whose files do not load: cut short by a full disk or an
    interrupted copy, or damaged. `problem` names the file and why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"checkpoint {path} does not load: {problem}; resume from another checkpoint "
                         "(--resume PATH, train.resume=PATH) or start over (--resume none)")
        self.path = path
        self.problem = problem


def resume_training_state(accelerator, resume: str, output_dir: str, layout: dict) -> tuple[str | None, TrainState]:
    """(the checkpoint resumed from or None, the loop's position) for `train.resume` (collective).

    'auto' takes the newest complete checkpoint that loads: one that does not is skipped with a one-line warning
    naming its file, and the one before it is tried. If checkpoints exist but none loads, that is a UsageError naming
    each: a run never silently starts over from scratch. A path that does not load is an `UnloadableCheckpoint`.
    """
    if resume != "auto":
        path = resolve_resume(resume, output_dir)
        return path, (load_training_state(accelerator, path, layout) if path is not None else TrainState())
    failed: list[UnloadableCheckpoint] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_training_state(accelerator, path, layout)
        except UnloadableCheckpoint as exc:
            failed.append(exc)
            if accelerator.is_main_process:
                print(f"warning: skipping checkpoint {path}: {exc.problem}; trying the one before it",
                      file=sys.stderr, flush=True)
    if failed:
        each = "; ".join(f"{os.path.basename(exc.path)}: {exc.problem}" for exc in failed)
        raise UsageError(f"no checkpoint under {os.path.join(output_dir, CHECKPOINTS_DIR)} loads ({each}); restore "
                         "the damaged files, pass an intact checkpoint with --resume PATH, or start over with "
                         "--resume none (train.resume=none)")
    return None, TrainState()


def load_training_state(accelerator, path: str, layout: dict) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from `path` and return the loop's position (collective).

    Raises `UnloadableCheckpoint` on every rank if a file does not load on any rank (so that all of them move on to
    the same earlier checkpoint), and UsageError if the run's `layout` differs from the checkpoint's.
    """
    problem = _agreed(accelerator, checkpoint_problem(path))
    if problem is not None:
        raise UnloadableCheckpoint(path, problem)
    with open(os.path.join(path, STATE_FILE)) as f:
        record = json.load(f)
    changed = {k: (record["layout"].get(k), v) for k, v in layout.items() if record["layout"].get(k) != v}
    if changed:
        what = ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in changed.items())
        raise UsageError(f"checkpoint {path} cannot resume this run: {what}; restore those settings, or set "
                         "train.resume=none to start over")
    data_name = f"data-rank{accelerator.process_index}.json"
    data, problem = _read_json(path, data_name)
    if problem is None:
        problem = _load_state(accelerator, path)
    problem = _agreed(accelerator, problem)
    if problem is not None:
        raise UnloadableCheckpoint(path, problem)
    return TrainState(step=record["step"], samples=record["samples"], batches=data["batches"], drawn=data["drawn"],
                      text_only=data["text_only"], skipped=data["skipped"], cpu_threads=record["cpu_threads"])


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot load (`model.safetensors is cut short or damaged (...)`), or None.

    Cheap enough for every resume: it reads the small JSON records whole, but of the weight files only what tells a
    whole file from a cut one (the safetensors header with its offsets, the index at the end of a torch archive).
    """
    for name in sorted(os.listdir(path)):
        problem = _read_json(path, name)[1] if name.endswith(".json") else _weights_problem(path, name)
        if problem is not None:
            return problem
    return None


def _weights_problem(path: str, name: str) -> str | None:
    """Why the weight file `path/name` is not whole, or None (also for files that hold no weights)."""
    from safetensors import SafetensorError, safe_open

    file = os.path.join(path, name)
    try:
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt"):
                pass
        elif name.endswith((".bin", ".pkl")):
            # accelerate writes these with torch.save: zip archives whose index is at the end, lost in a cut.
            zipfile.ZipFile(file).close()
    except (SafetensorError, zipfile.BadZipFile, OSError) as exc:
        return f"{name} is cut short or damaged ({_one_line(exc)})"
    return None


def _read_json(path: str, name: str) -> tuple[dict, str | None]:
    """(the JSON object in `path/name`, None), or ({}, why it cannot be read)."""
    try:
        with open(os.path.join(path, name)) as f:
            content = json.load(f)
    except FileNotFoundError:
        return {}, f"{name} is missing"
    except (OSError, ValueError) as exc:
        return {}, f"{name} is cut short or damaged ({_one_line(exc)})"
    if not isinstance(content, dict):
        return {}, f"{name} is damaged (a JSON {type(content).__name__}, not an object)"
    return content, None


def _load_state(accelerator, path: str) -> str | None:
    """`accelerator.load_state(path)`; what went wrong if it failed (what `checkpoint_problem` cannot see, such as
    weights of another shape)."""
    import torch

    try:
        accelerator.load_state(path)
    except torch.OutOfMemoryError:
        raise  # the device's problem, not the checkpoint's
    except Exception as exc:  # noqa: BLE001 - any file that does not load makes the checkpoint unusable
        return f"accelerate could not load it ({type(exc).__name__}: {_one_line(exc)})"
    return None


def _agreed(accelerator, problem: str | None) -> str | None:
    """This rank's `problem`, else the first other rank's: every rank must give up on a checkpoint together."""
    if accelerator.num_processes == 1:
        return problem
    from accelerate.utils import gather_object

    return next((p for p in gather_object([problem]) if p is not None), None)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
