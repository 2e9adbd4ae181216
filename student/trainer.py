"""`pipeline train`: the OLA-VLM coupled objective on precomputed targets, with accelerate.

One process per device (`accelerate launch` for many); no teacher is ever imported or loaded: the
targets come from the store written by `pipeline precompute`. The one exception is the explicit A/B mode
`data.online_teachers: true` (`--online-teachers`), which rebuilds the store's teachers in this process
(`pipeline/online_targets.py`) and computes the same targets at every step instead of reading them.

    pipeline train --config manifests/experiments/demo.yaml                     # one CPU / GPU
    accelerate launch -m pipeline train --config manifests/experiments/X.yaml   # every local GPU
    accelerate launch --multi_gpu --num_processes 2 -m pipeline train ...       # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 -m pipeline train ...                           # the same, without accelerate

(`accelerate launch --cpu` runs ONE process whatever --num_processes says; `--multi_gpu` picks the torchrun
launcher, and the trainer falls back to CPU by itself on a machine without GPUs.)

Rerunning the same command resumes from the newest checkpoint under output_dir (`train.resume: auto`) when
`train.save_every` > 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.errors import PipelineError, UsageError
from pipeline.loader import IMAGE_CHANGED, EpochOrder, TrainingSamples, training_index
from pipeline.store import TargetStore
from student.checkpoint import (
    PROVENANCE_FILE,
    TrainState,
    load_student,
    load_training_state,
    resolve_resume,
    save_training_state,
)
from student.config import ExperimentConfig, load_experiment
from student.data import BatchCollator, SampleEncoder
from student.loading import load_image_processor
from student.loss import CoupledLossConfig, coupled_loss
from student.model import DEFAULT_TASK_ORDER, OlaStudent, TaskLayersError

METRICS_FILE = "metrics.jsonl"
DATA_INDEX_DIR = "data_index"  # a stage without a store keeps its index of the shards here
TENSORBOARD_DIR = "tensorboard"


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
    loss_cfg: CoupledLossConfig
    store_info: dict
    online: object | None = None  # pipeline.online_targets.OnlineTargets with data.online_teachers, else None


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
        if expected and attrs["teacher_fingerprint"] != expected and not cfg.data.accept_fingerprint_mismatch:
            raise UsageError(
                f"store teacher {name!r} has fingerprint {attrs['teacher_fingerprint'][:12]}.. but the experiment "
                f"expects {expected[:12]}..; use the matching store or set data.accept_fingerprint_mismatch=true"
            )
        info["teachers"][name] = {"teacher_fingerprint": attrs["teacher_fingerprint"],
                                  "target_shape": attrs["target_shape"], "dtype": attrs["dtype"],
                                  "complete": attrs.get("complete", False), "spec": attrs.get("spec")}
    return info


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


def _load_student(cfg: ExperimentConfig, store_info: dict):
    """(model, tokenizer, image_processor): a new student from vision + LLM, or an earlier stage's student."""
    from transformers import AutoTokenizer

    if cfg.model.init_from is not None:
        source = cfg.model.init_from
        model, tokenizer, image_processor = load_student(source, field="model.init_from")
        have = {spec.name: spec.layers for spec in model.config.task_specs()}
        for name, task in cfg.model.tasks.items():
            if have.get(name) != task.layers:
                raise UsageError(f"model.tasks.{name}.layers {task.layers} do not match the student in {source} "
                                 f"(its tasks: {have}); the embedding losses can only train the student's own heads")
        return model, tokenizer, image_processor

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.llm)
    if cfg.model.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [cfg.model.image_token]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = load_image_processor(cfg.model.vision)
    names = list(cfg.model.tasks)
    order = cfg.model.task_order or [t for t in DEFAULT_TASK_ORDER if t in names] + [
        t for t in names if t not in DEFAULT_TASK_ORDER]
    tasks = [
        {"name": name, "layers": task.layers, "target_tokens": store_info["teachers"][name]["target_shape"][0],
         "target_dim": store_info["teachers"][name]["target_shape"][1], "seq_tokens": task.seq_tokens,
         "predictor_dim": task.predictor_dim, "out_mlp": task.out_mlp}
        for name, task in cfg.model.tasks.items()
    ]
    try:
        model = OlaStudent.from_parts(
            cfg.model.vision, cfg.model.llm, tasks=tasks, task_order=order,
            image_token_id=tokenizer.convert_tokens_to_ids(cfg.model.image_token),
            vision_feature_layer=cfg.model.vision_feature_layer, logit_scale_per=cfg.model.logit_scale_per,
            vision_field="model.vision", llm_field="model.llm",
        )
    except TaskLayersError as exc:  # raised from the configs, before any weights load
        raise UsageError(f"model.tasks.{exc.task}.layers {exc.layers}: the LLM {cfg.model.llm} has {exc.num_layers} "
                         f"layers; tap layers in 1..{exc.num_layers}") from None
    if len(tokenizer) > model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(len(tokenizer))
    return model, tokenizer, image_processor


def build_training(cfg: ExperimentConfig) -> TrainingParts:
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
    model, tokenizer, image_processor = _load_student(cfg, store_info)
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
    previous = TargetStore(cfg.data.store).previous_index() if cfg.data.store is not None else None
    with accelerator.main_process_first():
        index = training_index(cfg.data.shards, os.path.join(cfg.output_dir, DATA_INDEX_DIR), previous=previous,
                               progress=accelerator.is_main_process)
    encoder = SampleEncoder(image_processor, tokenizer, cfg.data.max_length, keep_image=online,
                            image_aspect_ratio=cfg.data.image_aspect_ratio)
    dataset = TrainingSamples(cfg.data.shards, cfg.data.store, read, encoder, index=index,
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
    loss_cfg = CoupledLossConfig(
        lm_weight=cfg.loss.lm_weight, smooth_l1_beta=cfg.loss.smooth_l1_beta,
        contrastive_weight=cfg.loss.contrastive_weight, layer_weight=cfg.loss.layer_weight,
        logit_scale_max=cfg.loss.logit_scale_max, task_weights={n: t.weight for n, t in cfg.model.tasks.items()},
    )
    teachers = _online_teachers(cfg, accelerator, store_info) if online else None
    return TrainingParts(cfg, accelerator, model, optimizer, scheduler, loader, dataset, order, tokenizer,
                         image_processor, loss_cfg, store_info, teachers)


def _online_teachers(cfg: ExperimentConfig, accelerator, store_info: dict):
    from pipeline.online_targets import OnlineTargets  # imports `teachers`: only ever in this mode

    # Loading teachers must not move the RNG the student's training draws from: an A/B pair of runs has to be the
    # same run but for where the targets come from.
    with torch.random.fork_rng(devices=[]):
        online = OnlineTargets(cfg.data.store, list(cfg.model.tasks), device=accelerator.device,
                               accept_fingerprint_mismatch=cfg.data.accept_fingerprint_mismatch)
    store_info["online_teachers"] = True
    for name, fingerprint in online.fingerprints.items():
        store_info["teachers"][name]["online_fingerprint"] = fingerprint
    return online


def batch_targets(parts: TrainingParts, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The batch's targets {task: [B, T, C] float32} and valid flags {task: [B] bool}: read from the store by the
    loader, or computed now by the online teachers."""
    if parts.online is None:
        return batch["targets"], batch["valid"]
    return parts.online(batch["images"])


def compute_loss(parts: TrainingParts, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the student on a batch and return (total loss, every term)."""
    device = parts.accelerator.device
    model = parts.model
    tasks = parts.cfg.model.tasks
    out = model(pixel_values=batch["pixel_values"].to(device), input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device), labels=batch["labels"].to(device),
                compute_predictions=bool(tasks))
    # A student from an earlier stage may carry heads whose loss this stage leaves off.
    predictions = {k: v for k, v in out.predictions.items() if k in tasks}
    targets, valid = batch_targets(parts, batch)
    targets = {k: v.to(device) for k, v in targets.items()}
    valid = {k: v.to(device) for k, v in valid.items()}
    unwrapped = parts.accelerator.unwrap_model(model)
    gather = parts.accelerator.gather if parts.accelerator.num_processes > 1 else None
    return coupled_loss(out.loss, predictions, targets, valid, unwrapped.logit_scales, parts.loss_cfg,
                        gather=gather)


def train_step(parts: TrainingParts, batch: dict) -> dict[str, float]:
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


def _hparams(cfg: ExperimentConfig) -> dict:
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


def _open_metrics(path: str, resumed_step: int):
    """metrics.jsonl for appending: records after `resumed_step` (from a run that died later) are dropped."""
    kept = []
    if resumed_step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
    f = open(path, "w")
    f.writelines(kept)
    return f


def _fetch(data) -> dict:
    try:
        return next(data)
    except PipelineError as exc:
        # A DataLoader re-raises a worker's error with the worker's traceback as its message; the CLI prints one line.
        message = str(exc)
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        raise type(exc)(message) from None


def _next_batch(parts: TrainingParts, data, state: TrainState) -> dict:
    """The next batch with at least one usable sample; every batch taken, used or not, moves the data position."""
    unusable = Counter()
    while True:
        batch = _fetch(data)
        state.consumed(batch)
        for item in batch["skipped_items"]:
            parts.dataset.note_skipped(item)
        if batch["size"]:
            return batch
        unusable.update(batch["skipped"])
        if sum(unusable.values()) >= parts.order.per_rank:
            # Otherwise training would look for a usable sample forever (e.g. shards rewritten under the same
            # names, so that every image hash differs from the store's index).
            reasons = ", ".join(f"{n} x {r}" for r, n in unusable.most_common())
            raise UsageError(f"{sum(unusable.values())} samples in a row could not be trained on ({reasons}); were "
                             "the shards rewritten after the store was built?")


def _data_counts(parts: TrainingParts, state: TrainState) -> dict[str, int]:
    """Text-only samples trained on and samples skipped so far (all ranks), and samples the stage left out; the
    reasons are in the run's summary."""
    counts = torch.tensor([state.text_only, sum(state.skipped.values())], dtype=torch.float64)
    if parts.accelerator.num_processes > 1:
        counts = parts.accelerator.reduce(counts.to(parts.accelerator.device), reduction="sum").cpu()
    # Left out before any read (text-only samples in a stage with targets, duplicates, no text): the same on every
    # rank, since every rank sees the whole index.
    return {"text_only_samples": int(counts[0]), "skipped_samples": int(counts[1]),
            "excluded_samples": sum(parts.dataset.excluded.values())}


def _mean_terms(parts: TrainingParts, sums: dict[str, float], count: int) -> dict[str, float]:
    """Average the loss terms over micro-batches and (with several processes) over ranks."""
    names = sorted(sums)
    values = torch.tensor([sums[k] / count for k in names], dtype=torch.float64)
    if parts.accelerator.num_processes > 1:
        values = parts.accelerator.reduce(values.to(parts.accelerator.device), reduction="mean").cpu()
    return dict(zip(names, values.tolist()))


def train(cfg: ExperimentConfig, *, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    parts = build_training(cfg)
    acc = parts.accelerator
    os.makedirs(cfg.output_dir, exist_ok=True)
    layout = _data_layout(parts)
    from accelerate.utils import gather_object

    resume_dir = resolve_resume(cfg.train.resume, cfg.output_dir)
    state = TrainState()
    earlier_rows = _rows_of(resume_dir) if resume_dir is not None else []
    if resume_dir is not None:
        state = load_training_state(acc, resume_dir, layout)
        parts.order.start = state.drawn
        if acc.is_main_process:
            print(f"resuming from {resume_dir} (step {state.step})", flush=True)
    if cfg.train.trackers:
        acc.init_trackers(cfg.name, config=_hparams(cfg))
    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
    rows_seen: list[int] = []
    first, last = {}, {}
    per_step = cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
    start_step = state.step
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", unit="step",
               disable=not progress or not acc.is_main_process)
    with _open_metrics(metrics_path, state.step) if acc.is_main_process else open(os.devnull, "w") as metrics:
        data = iter(parts.loader)
        while state.step < cfg.train.max_steps:
            step_started = time.perf_counter()
            waited = 0.0
            sums: dict[str, float] = {}
            for _ in range(cfg.train.grad_accum):
                fetch_started = time.perf_counter()
                batch = _next_batch(parts, data, state)
                waited += time.perf_counter() - fetch_started
                rows_seen.extend(batch["rows"].tolist())
                for k, v in train_step(parts, batch).items():
                    sums[k] = sums.get(k, 0.0) + v
            state.step += 1
            state.samples += per_step
            terms = _mean_terms(parts, sums, cfg.train.grad_accum)
            seconds = max(time.perf_counter() - step_started, 1e-9)
            first = first or terms
            last = terms
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                record = {"step": state.step, **terms, "lr": parts.scheduler.get_last_lr()[0],
                          "samples_per_s": per_step / seconds, "data_wait_fraction": waited / seconds,
                          **_data_counts(parts, state)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if cfg.train.trackers:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
            if cfg.train.save_every and (state.step % cfg.train.save_every == 0
                                         or state.step == cfg.train.max_steps):
                provenance = _provenance(parts, state, terms, resume_dir, earlier_rows + gather_object(rows_seen))
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
        json.dump(_provenance(parts, state, final_loss, resumed_from, rows), f, indent=1, sort_keys=True)


def _provenance(parts: TrainingParts, state: TrainState, loss: dict[str, float], resumed_from: str | None,
                rows: list[int]) -> dict:
    """What made a checkpoint (the finished student, and every resumable `step-N/`): config, store, progress."""
    acc = parts.accelerator
    return {
        "config": parts.cfg.model_dump(mode="json"),
        "store": parts.store_info,
        "steps": state.step,
        "samples": state.samples,
        "world_size": acc.num_processes,
        "distributed_type": acc.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "resumed_from": resumed_from,
        # The store rows trained on (every rank, every invocation since the first), as [start, stop) ranges: a
        # checkpoint names its data.
        "rows": {"count": len(set(rows)), "ranges": _row_ranges(rows)},
        "final_loss": loss,
        "created_by": "teacher-targets-pipeline",
    }


def _rows_of(checkpoint: str) -> list[int]:
    """The rows a resumable checkpoint's provenance names ([] for one saved before step provenance existed)."""
    try:
        with open(os.path.join(checkpoint, PROVENANCE_FILE)) as f:
            ranges = json.load(f)["rows"]["ranges"]
    except FileNotFoundError:
        return []
    return [row for start, stop in ranges for row in range(start, stop)]


def _row_ranges(rows: list[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for row in sorted(set(rows)):
        if ranges and ranges[-1][1] == row:
            ranges[-1][1] = row + 1
        else:
            ranges.append([row, row + 1])
    return ranges


def train_from_config(path: str, overrides: list[str] | None = None, *, progress: bool = True) -> TrainResult:
    return train(load_experiment(path, overrides), progress=progress)
