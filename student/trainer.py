"""`pipeline train`: the OLA-VLM coupled objective on precomputed targets, with accelerate.

One process per device (`accelerate launch` for many); no teacher is ever imported or loaded: the
targets come from the store written by `pipeline precompute`. The one exception is the explicit A/B mode
`data.online_teachers: true` (`--online-teachers`), which computes the same targets at every step with the store's
teachers instead of reading them. Even then this package does not import `teachers`: the caller hands `train` a
factory of them (`online_targets=`; `pipeline train` builds it with `pipeline/online_targets.py`).

The parts it wires have modules of their own: the student (`student/build.py`), the checkpoints
(`student/checkpoint.py`) and what they record (`student/provenance.py`), the logs (`student/metrics.py`).

    pipeline train --config manifests/experiments/demo.yaml                     # one CPU / GPU
    accelerate launch -m pipeline train --config manifests/experiments/X.yaml   # every local GPU
    accelerate launch --multi_gpu --num_processes 2 -m pipeline train ...       # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 -m pipeline train ...                           # the same, without accelerate

(`accelerate launch --cpu` runs ONE process whatever --num_processes says; `--multi_gpu` picks the torchrun
launcher, and the trainer falls back to CPU by itself on a machine without GPUs.)

Rerunning the same command resumes from the newest checkpoint under output_dir that loads (`train.resume: auto`)
when `train.save_every` > 0; one cut short is skipped with a warning naming the file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data.errors import PipelineError, UsageError
from pipeline.data.loader import IMAGE_CHANGED, EpochOrder, TrainingSamples, training_index
from pipeline.data.store import TargetStore
from student.build import assemble_student
from student.checkpoint import PROVENANCE_FILE, TrainState, resume_training_state, save_training_state
from student.config import ExperimentConfig
from student.data import Batch, BatchCollator, SampleEncoder
from student.loss import coupled_loss
from student.metrics import METRICS_FILE, TENSORBOARD_DIR, data_counts, hparams, mean_terms, open_metrics
from student.provenance import check_store, rows_of, run_provenance

DATA_INDEX_DIR = "data_index"  # a stage without a store keeps its index of the shards here


class OnlineTargetSource(Protocol):
    """The store's teachers in this process (`pipeline.online_targets.OnlineTargets`): a batch's decoded images ->
    ({teacher: [B, T, C] float32}, {teacher: [B] bool}), rounded as the store rounds them."""

    fingerprints: dict[str, str]  # teacher name -> fingerprint of the teacher as rebuilt

    def __call__(self, images: Sequence) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...


# Builds the online teachers on a device; called once per process, in `data.online_teachers` mode only.
OnlineTargetsFactory = Callable[[torch.device], OnlineTargetSource]


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    first_loss: dict[str, float]
    final_loss: dict[str, float]
    samples_seen: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples left out (this rank)
    text_only: int = 0  # text-only samples trained on (this rank)
    resumed_from: str | None = None

    def summary(self) -> str:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in self.final_loss.items() if "/" not in k)
        resumed = f" (resumed from {self.resumed_from})" if self.resumed_from else ""
        text = (f"trained {self.steps} steps{resumed}, {self.samples_seen} samples in all, in {self.seconds:.1f}s "
                f"-> {self.output_dir}\n  final losses: {terms}")
        if self.text_only:
            text += f"\n  text-only samples trained on: {self.text_only}"
        if self.skipped:
            text += "\n  skipped samples: " + ", ".join(f"{n} x {reason}" for reason, n in self.skipped.items())
        return text


@dataclass
class TrainingParts:
    """Everything a training step needs, built from one experiment config."""

    cfg: ExperimentConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    dataset: TrainingSamples
    order: EpochOrder
    tokenizer: object
    image_processor: object
    store_info: dict
    online: OnlineTargetSource | None = None  # with data.online_teachers, else None


def _has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def _check_sharded(accelerator) -> None:
    """Refuse a launch configured for FSDP that accelerate did not shard."""
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.FSDP:
        # accelerate picks FSDP only for accelerator devices; on CPU processes it wraps the model in DDP instead,
        # without a word, and every rank would then hold the whole student and its optimizer state.
        raise UsageError(f"the accelerate config asks for FSDP, but accelerate runs this launch as "
                         f"{accelerator.distributed_type.value} on {accelerator.device.type}: it shards with FSDP "
                         "only on GPUs (and other accelerators). Launch on GPUs, or train unsharded on CPU "
                         "processes with `accelerate launch --multi_gpu --num_processes N` and no FSDP config")


def build_training(cfg: ExperimentConfig, *, online_targets: OnlineTargetsFactory | None = None,
                   progress: bool = True) -> TrainingParts:
    """Everything `train` needs for `cfg`; `online_targets` builds the store's teachers when
    `cfg.data.online_teachers` (see `train`); `progress`: a bar while the shards are indexed."""
    if cfg.data.online_teachers and online_targets is None:
        raise UsageError("data.online_teachers=true computes the targets with the store's teachers, which the trainer "
                         "does not import: pass online_targets=pipeline.online_targets.online_targets_factory(cfg) "
                         "(as `pipeline train --online-teachers` does), or set data.online_teachers=false")
    _check_output_dir(cfg.output_dir)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from transformers import get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would bury the training bar

    # cpu=True on a machine without GPUs is what lets `accelerate launch --num_processes N` / torchrun form a
    # gloo process group instead of N independent single-process runs.
    accelerator = Accelerator(
        cpu=not _has_accelerator_device(), mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum, log_with=list(cfg.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, TENSORBOARD_DIR)),
    )
    _check_sharded(accelerator)
    set_seed(cfg.seed)
    store_info = check_store(cfg) if cfg.data.store is not None else {"store": None, "teachers": {}}
    target_shapes = {name: tuple(info["target_shape"]) for name, info in store_info["teachers"].items()}
    model, tokenizer, image_processor = assemble_student(cfg.model, target_shapes)
    model.set_trainable(cfg.model.trainable)
    if cfg.train.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    names = list(cfg.model.tasks)
    online = cfg.data.online_teachers
    # Online, the loader still aligns samples with the store's index but reads no target; it hands over the
    # decoded images instead, and the teachers turn them into targets in this process (see compute_loss).
    read = [] if online else names
    # The shards as they are now: only shards whose size or mtime moved since the store (or an earlier run of this
    # experiment) recorded them are read again, by one rank; the others find its index.
    store = TargetStore(cfg.data.store) if cfg.data.store is not None else None
    # Read once: the store's index serves both the re-indexing of the shards and the matching of samples to rows.
    stored = store.read_index() if store is not None else None
    previous = store.previous_index(stored) if store is not None else None
    with accelerator.main_process_first():
        index = training_index(cfg.data.shards, os.path.join(cfg.output_dir, DATA_INDEX_DIR), previous=previous,
                               progress=progress and accelerator.is_main_process)
    encoder = SampleEncoder(image_processor, tokenizer, cfg.data.max_length, keep_image=online,
                            image_aspect_ratio=cfg.data.image_aspect_ratio)
    dataset = TrainingSamples(cfg.data.shards, cfg.data.store, read, encoder, index=index, stored_index=stored,
                              check_image_hash=cfg.data.check_image_hash, text_only=not names)
    if len(dataset.rows) < accelerator.num_processes:
        reasons = ", ".join(f"{n} x {r}" for r, n in dataset.excluded.most_common()) or "no samples"
        hint = "; were the shards rewritten after the store was built?" if IMAGE_CHANGED in dataset.excluded else ""
        raise UsageError(f"{len(dataset.rows)} of the samples in {cfg.data.shards} can be trained on in this stage "
                         f"({reasons}); {accelerator.num_processes} rank(s) need at least one each{hint}")
    order = EpochOrder(dataset.rows, seed=cfg.seed, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, shuffle=cfg.data.shuffle)
    # Its own generator: creating the loader's iterator must not draw from the global RNG, which a resumed run
    # restores from the checkpoint.
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=order, num_workers=cfg.data.num_workers,
                        collate_fn=BatchCollator(tokenizer.pad_token_id, read),
                        persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"model.trainable {cfg.model.trainable} selects no parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # accelerate's prepared scheduler advances once per process at every optimizer step (it assumes a schedule
    # written in per-process batches); stretch the schedule so it spans max_steps on any number of processes.
    n = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps) * n,
        num_training_steps=cfg.train.max_steps * n,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    teachers = _online_teachers(online_targets, accelerator.device, store_info) if online else None
    return TrainingParts(cfg, accelerator, model, optimizer, scheduler, loader, dataset, order, tokenizer,
                         image_processor, store_info, teachers)


def _check_output_dir(path: str) -> None:
    """Fail now, not after the models load, when output_dir cannot hold the run; create nothing yet, so that a run
    refused for another reason leaves no folder behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output_dir={path} is a file, not a directory; set output_dir (--set output_dir=DIR) to a "
                         "new or existing directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output_dir={path} cannot be created: {existing} is not a directory this user can write; "
                         "set output_dir (--set output_dir=DIR) to one")


def _online_teachers(factory: OnlineTargetsFactory, device: torch.device, store_info: dict) -> OnlineTargetSource:
    # Loading teachers must not move the RNG the student's training draws from: an A/B pair of runs has to be the
    # same run but for where the targets come from.
    with torch.random.fork_rng(devices=[]):
        online = factory(device)
    store_info["online_teachers"] = True
    for name, fingerprint in online.fingerprints.items():
        store_info["teachers"][name]["online_fingerprint"] = fingerprint
    return online


def batch_targets(parts: TrainingParts, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The batch's targets {task: [B, T, C] float32} and valid flags {task: [B] bool}: read from the store by the
    loader, or computed now by the online teachers."""
    if parts.online is None:
        return batch.targets, batch.valid
    return parts.online(batch.images)


def compute_loss(parts: TrainingParts, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the student on a batch and return (total loss, every term)."""
    device = parts.accelerator.device
    model = parts.model
    tasks = parts.cfg.model.tasks
    out = model(pixel_values=batch.pixel_values.to(device), input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device), labels=batch.labels.to(device),
                compute_predictions=bool(tasks))
    # A student from an earlier stage may carry heads whose loss this stage leaves off.
    predictions = {k: v for k, v in out.predictions.items() if k in tasks}
    targets, valid = batch_targets(parts, batch)
    targets = {k: v.to(device) for k, v in targets.items()}
    valid = {k: v.to(device) for k, v in valid.items()}
    unwrapped = parts.accelerator.unwrap_model(model)
    gather = parts.accelerator.gather if parts.accelerator.num_processes > 1 else None
    return coupled_loss(out.loss, predictions, targets, valid, unwrapped.logit_scales, parts.cfg.loss,
                        gather=gather, task_weights={name: task.weight for name, task in tasks.items()})


def train_step(parts: TrainingParts, batch: Batch) -> dict[str, float]:
    """One optimizer step (with gradient accumulation handled by accelerate); returns the loss terms."""
    acc = parts.accelerator
    parts.model.train()
    with acc.accumulate(parts.model):
        total, terms = compute_loss(parts, batch)
        acc.backward(total)
        if acc.sync_gradients:
            acc.clip_grad_norm_([p for p in parts.model.parameters() if p.requires_grad], parts.cfg.train.max_grad_norm)
        parts.optimizer.step()
        parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def _data_layout(parts: TrainingParts) -> dict:
    """The settings a saved data position is only valid under."""
    cfg = parts.cfg
    # Not the number of loader workers: the order is the sampler's, whoever reads the samples.
    return {"world_size": parts.accelerator.num_processes, "batch_size": cfg.data.batch_size,
            "grad_accum": cfg.train.grad_accum, "shards": cfg.data.shards, "shuffle": cfg.data.shuffle,
            "seed": cfg.seed, "samples": len(parts.dataset.rows)}


def _fetch(data) -> Batch:
    try:
        return next(data)
    except PipelineError as exc:
        # A DataLoader re-raises a worker's error with the worker's traceback as its message; the CLI prints one line.
        message = str(exc)
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        raise type(exc)(message) from None


def _next_batch(parts: TrainingParts, data, state: TrainState) -> Batch:
    """The next batch with at least one usable sample; every batch taken, used or not, moves the data position."""
    unusable = Counter()
    while True:
        batch = _fetch(data)
        state.consumed(batch)
        for item in batch.skipped_items:
            parts.dataset.note_skipped(item)
        if batch.size:
            return batch
        unusable.update(batch.skipped)
        if sum(unusable.values()) >= parts.order.per_rank:
            # Otherwise training would look for a usable sample forever (e.g. shards rewritten under the same
            # names, so that every image hash differs from the store's index).
            reasons = ", ".join(f"{n} x {r}" for r, n in unusable.most_common())
            raise UsageError(f"{sum(unusable.values())} samples in a row could not be trained on ({reasons}); were "
                             "the shards rewritten after the store was built?")


def _use_cpu_threads(cfg: ExperimentConfig, state: TrainState, accelerator) -> None:
    """Compute with `train.cpu_threads` torch intra-op threads, else with the count of the run this one resumes, else
    with this process's count; `state` records it for the checkpoints.

    A reduction split over another number of threads adds in another order: a run resumed in a process with another
    count (another machine, OMP_NUM_THREADS, or a caller that set torch's threads) would drift from the uninterrupted
    run in the seventh digit from its first step on. Set even when the count is already right: the first
    `torch.set_num_threads` in a process also turns MKL's dynamic threading off for good, which moves the bits of
    some of MKL's products too, so a fresh process and one where other code set the threads compute alike only once
    both have set them.
    """
    threads = cfg.train.cpu_threads or state.cpu_threads or torch.get_num_threads()
    if threads != torch.get_num_threads() and threads != cfg.train.cpu_threads and accelerator.is_main_process:
        print(f"computing with {threads} CPU threads, as the run it resumes did (this process had "
              f"{torch.get_num_threads()}); set train.cpu_threads to choose another count", flush=True)
    torch.set_num_threads(threads)
    state.cpu_threads = threads


def train(cfg: ExperimentConfig, *, online_targets: OnlineTargetsFactory | None = None,
          progress: bool = True) -> TrainResult:
    """Train the student `cfg` describes, resuming from its newest checkpoint if `train.resume` says so.

    `online_targets`: with `data.online_teachers: true`, a factory of the store's teachers on a device
    (`pipeline.online_targets.online_targets_factory(cfg)`); the trainer never imports them itself. Without it that
    mode is a `UsageError`.

    Computes with `train.cpu_threads` torch threads (see `_use_cpu_threads`), and gives the calling process its own
    thread count back when it returns.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, online_targets, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ExperimentConfig, online_targets: OnlineTargetsFactory | None, progress: bool) -> TrainResult:
    started = time.perf_counter()
    parts = build_training(cfg, online_targets=online_targets, progress=progress)
    acc = parts.accelerator
    layout = _data_layout(parts)
    from accelerate.utils import gather_object

    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_dir, state = resume_training_state(acc, cfg.train.resume, cfg.output_dir, layout)
    _use_cpu_threads(cfg, state, acc)
    earlier_rows = rows_of(resume_dir) if resume_dir is not None else []
    if resume_dir is not None:
        parts.order.start = state.drawn
        if acc.is_main_process:
            print(f"resuming from {resume_dir} (step {state.step})", flush=True)
    if cfg.train.trackers:
        acc.init_trackers(cfg.name, config=hparams(cfg))
    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
    rows_seen: list[int] = []
    first, last = {}, {}
    per_step = cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
    start_step = state.step
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", unit="step",
               disable=not progress or not acc.is_main_process)
    with open_metrics(metrics_path, state.step) if acc.is_main_process else open(os.devnull, "w") as metrics:
        data = iter(parts.loader)
        while state.step < cfg.train.max_steps:
            step_started = time.perf_counter()
            waited = 0.0
            sums: dict[str, float] = {}
            for _ in range(cfg.train.grad_accum):
                fetch_started = time.perf_counter()
                batch = _next_batch(parts, data, state)
                waited += time.perf_counter() - fetch_started
                rows_seen.extend(batch.rows.tolist())
                for k, v in train_step(parts, batch).items():
                    sums[k] = sums.get(k, 0.0) + v
            state.step += 1
            state.samples += per_step
            terms = mean_terms(acc, sums, cfg.train.grad_accum)
            seconds = max(time.perf_counter() - step_started, 1e-9)
            first = first or terms
            last = terms
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                record = {"step": state.step, **terms, "lr": parts.scheduler.get_last_lr()[0],
                          "samples_per_s": per_step / seconds, "data_wait_fraction": waited / seconds,
                          **data_counts(acc, state, parts.dataset.excluded)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if cfg.train.trackers:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
            if cfg.train.save_every and (state.step % cfg.train.save_every == 0
                                         or state.step == cfg.train.max_steps):
                provenance = run_provenance(cfg, parts.store_info, acc, state, terms, resume_dir,
                                            earlier_rows + gather_object(rows_seen))
                save_training_state(acc, cfg.output_dir, state, layout, keep=cfg.train.keep_checkpoints,
                                    files={PROVENANCE_FILE: provenance})
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
    bar.close()
    if cfg.train.record_rows:
        with open(os.path.join(cfg.output_dir, f"rows-rank{acc.process_index}.json"), "w") as f:
            json.dump(rows_seen, f)
    save_checkpoint(parts, state, last, resumed_from=resume_dir, rows=earlier_rows + gather_object(rows_seen))
    if cfg.train.trackers:
        acc.end_training()
    return TrainResult(output_dir=cfg.output_dir, steps=state.step - start_step, first_loss=first, final_loss=last,
                       samples_seen=state.samples, seconds=time.perf_counter() - started,
                       skipped=dict(parts.dataset.excluded + Counter(state.skipped)), text_only=state.text_only,
                       resumed_from=resume_dir)


def save_checkpoint(parts: TrainingParts, state: TrainState, final_loss: dict[str, float],
                    resumed_from: str | None = None, rows: list[int] = ()) -> None:
    """`save_pretrained` student + tokenizer + image processor, and the provenance of the run beside them."""
    acc = parts.accelerator
    acc.wait_for_everyone()
    # Sharded (FSDP, ZeRO-3), each rank holds a piece of the weights: gathering them is collective, so every rank
    # takes part; the main one receives the full tensors on the CPU and writes them.
    weights = acc.get_state_dict(parts.model)
    if not acc.is_main_process:
        return
    out = parts.cfg.output_dir
    acc.unwrap_model(parts.model).save_pretrained(out, state_dict=weights)
    parts.tokenizer.save_pretrained(out)
    parts.image_processor.save_pretrained(out)
    with open(os.path.join(out, PROVENANCE_FILE), "w") as f:
        json.dump(run_provenance(parts.cfg, parts.store_info, acc, state, final_loss, resumed_from, rows), f,
                  indent=1, sort_keys=True)
