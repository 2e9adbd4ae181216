"""`pipeline train`: the OLA-VLM coupled objective on precomputed targets, with accelerate.

One process per device (`accelerate launch` for many); no teacher is ever imported or loaded: the
targets come from the store written by `pipeline precompute`.

    pipeline train --config manifests/experiments/demo.yaml                     # one CPU / GPU
    accelerate launch -m pipeline train --config manifests/experiments/X.yaml   # every local GPU
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.errors import UsageError
from pipeline.loader import TrainingSamples
from pipeline.store import TargetStore
from student.config import ExperimentConfig, load_experiment
from student.data import BatchCollator, SampleEncoder
from student.loss import CoupledLossConfig, coupled_loss
from student.model import OlaStudent

DEFAULT_TASK_ORDER = ("gen", "depth", "seg")
PROVENANCE_FILE = "training_provenance.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    first_loss: dict[str, float]
    final_loss: dict[str, float]
    samples_seen: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in self.final_loss.items() if "/" not in k)
        return (f"trained {self.steps} steps on {self.samples_seen} samples in {self.seconds:.1f}s -> "
                f"{self.output_dir}\n  final losses: {terms}")


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
    tokenizer: object
    image_processor: object
    loss_cfg: CoupledLossConfig
    store_info: dict


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


def build_training(cfg: ExperimentConfig) -> TrainingParts:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoImageProcessor, AutoTokenizer, get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would bury the training bar

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum)
    set_seed(cfg.seed)
    store_info = check_store(cfg)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.llm)
    if cfg.model.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [cfg.model.image_token]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(cfg.model.vision)

    names = list(cfg.model.tasks)
    order = cfg.model.task_order or [t for t in DEFAULT_TASK_ORDER if t in names] + [
        t for t in names if t not in DEFAULT_TASK_ORDER]
    tasks = [
        {"name": name, "layers": task.layers, "target_tokens": store_info["teachers"][name]["target_shape"][0],
         "target_dim": store_info["teachers"][name]["target_shape"][1], "seq_tokens": task.seq_tokens,
         "predictor_dim": task.predictor_dim, "out_mlp": task.out_mlp}
        for name, task in cfg.model.tasks.items()
    ]
    model = OlaStudent.from_parts(
        cfg.model.vision, cfg.model.llm, tasks=tasks, task_order=order,
        image_token_id=tokenizer.convert_tokens_to_ids(cfg.model.image_token),
        vision_feature_layer=cfg.model.vision_feature_layer,
    )
    if len(tokenizer) > model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(len(tokenizer))
    model.set_trainable(cfg.model.trainable)

    dataset = TrainingSamples(
        cfg.data.shards, cfg.data.store, names, SampleEncoder(image_processor, tokenizer, cfg.data.max_length),
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        check_image_hash=cfg.data.check_image_hash,
    )
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=BatchCollator(tokenizer.pad_token_id, names),
                        persistent_workers=cfg.data.num_workers > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"model.trainable {cfg.model.trainable} selects no parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps),
        num_training_steps=cfg.train.max_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_cfg = CoupledLossConfig(
        lm_weight=cfg.loss.lm_weight, smooth_l1_beta=cfg.loss.smooth_l1_beta,
        contrastive_weight=cfg.loss.contrastive_weight, layer_weight=cfg.loss.layer_weight,
        logit_scale_max=cfg.loss.logit_scale_max, task_weights={n: t.weight for n, t in cfg.model.tasks.items()},
    )
    return TrainingParts(cfg, accelerator, model, optimizer, scheduler, loader, dataset, tokenizer, image_processor,
                         loss_cfg, store_info)


def compute_loss(parts: TrainingParts, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the student on a batch and return (total loss, every term)."""
    device = parts.accelerator.device
    model = parts.model
    out = model(pixel_values=batch["pixel_values"].to(device), input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device), labels=batch["labels"].to(device))
    targets = {k: v.to(device) for k, v in batch["targets"].items()}
    valid = {k: v.to(device) for k, v in batch["valid"].items()}
    unwrapped = parts.accelerator.unwrap_model(model)
    gather = parts.accelerator.gather if parts.accelerator.num_processes > 1 else None
    return coupled_loss(out.loss, out.predictions, targets, valid, unwrapped.logit_scales, parts.loss_cfg,
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


def train(cfg: ExperimentConfig, *, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    parts = build_training(cfg)
    acc = parts.accelerator
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
    rows_seen: set[int] = set()
    first, last = {}, {}
    samples = 0
    bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", disable=not progress or not acc.is_main_process)
    with open(metrics_path, "w") if acc.is_main_process else open(os.devnull, "w") as metrics:
        data = iter(parts.loader)
        step = 0
        while step < cfg.train.max_steps:
            step_started = time.perf_counter()
            for _ in range(cfg.train.grad_accum):
                batch = next(data)
                rows_seen.update(batch["rows"].tolist())
                samples += len(batch["rows"]) * acc.num_processes
                terms = train_step(parts, batch)
            step += 1
            first = first or terms
            last = terms
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                record = {"step": step, **terms, "lr": parts.scheduler.get_last_lr()[0],
                          "samples_per_s": cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
                          / max(time.perf_counter() - step_started, 1e-9)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
    bar.close()
    save_checkpoint(parts, rows_seen, last)
    return TrainResult(output_dir=cfg.output_dir, steps=cfg.train.max_steps, first_loss=first, final_loss=last,
                       samples_seen=samples, seconds=time.perf_counter() - started,
                       skipped=dict(parts.dataset.skipped))


def save_checkpoint(parts: TrainingParts, rows_seen: set[int], final_loss: dict[str, float]) -> None:
    """`save_pretrained` student + tokenizer + image processor, and the provenance of the run beside them."""
    acc = parts.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    out = parts.cfg.output_dir
    acc.unwrap_model(parts.model).save_pretrained(out)
    parts.tokenizer.save_pretrained(out)
    parts.image_processor.save_pretrained(out)
    provenance = {
        "config": parts.cfg.model_dump(mode="json"),
        "store": parts.store_info,
        "rows_seen_on_rank0": len(rows_seen),
        "final_loss": final_loss,
        "created_by": "teacher-targets-pipeline",
    }
    with open(os.path.join(out, PROVENANCE_FILE), "w") as f:
        json.dump(provenance, f, indent=1, sort_keys=True)


def train_from_config(path: str, overrides: list[str] | None = None, *, progress: bool = True) -> TrainResult:
    return train(load_experiment(path, overrides), progress=progress)
