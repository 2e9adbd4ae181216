"""Experiment manifests (`manifests/experiments/*.yaml`): one strict, nested schema per component.

An unknown key is an error that names it; `--set a.b=c` overrides go through the same checks. The
resolved config is saved inside every checkpoint, so a checkpoint explains how it was made.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.config import load_config
from pipeline.data.errors import UsageError
from pipeline.data.shards import expand_braces
from student.loss import LossConfig
from student.task import TaskHeadConfig

_STRICT = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(BaseModel):
    model_config = _STRICT

    shards: str = Field(description="WebDataset shards: directory, brace pattern or fsspec URL")
    store: str | None = Field(
        description="target store written by `pipeline precompute` for these shards; null = no targets "
        "(next-token-only stages such as VPT/IFT, where model.tasks is empty)"
    )
    batch_size: int = Field(default=4, gt=0, description="samples per process per step")
    num_workers: int = Field(default=1, ge=0, description="DataLoader worker processes per rank (each reads, decodes "
                             "and tokenizes samples on one CPU core)")
    max_length: int = Field(default=256, gt=8, description="text tokens per sample (image tokens come on top)")
    check_image_hash: bool = Field(default=True, description="skip samples whose image bytes differ from the index")
    shuffle: bool = Field(
        default=True, description="visit the samples in a seeded random order, a new one every epoch, as LLaVA does; "
        "false: index order (shard, then file order), for A/B comparisons"
    )
    image_aspect_ratio: Literal["processor", "pad"] = Field(
        default="processor", description="'pad': expand each image to a square of the processor's mean colour "
        "before the processor, as the reference's VPT and IFT do; 'processor': its own resize and centre crop (PT)"
    )
    expected_fingerprints: dict[str, str] = Field(
        default_factory=dict, description="teacher name -> teacher_fingerprint the store must have"
    )
    accept_fingerprint_mismatch: bool = False
    online_teachers: bool = Field(
        default=False,
        description="A/B mode: compute the targets with the teachers whose specs the store recorded, in the training "
        "process, instead of reading them (same storage rounding and valid flags); for parity checks and timing",
    )

    @field_validator("shards")
    @classmethod
    def _braces_pair_up(cls, shards: str) -> str:
        # Here, not only where the trainer expands the pattern: that comes after the student has loaded.
        try:
            expand_braces(shards)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return shards


class TaskConfig(TaskHeadConfig):
    """One distillation task: the student's heads for a teacher group of the store (``TaskHeadConfig``: the LLM
    layers that predict it, ...) and the weight of its loss."""

    model_config = _STRICT

    weight: float = Field(default=1.0, ge=0, description="weight of this task's loss in the total")


class ModelConfig(BaseModel):
    model_config = _STRICT

    vision: str | None = Field(
        default=None, description="HF vision encoder (hub id or local dir), e.g. openai/clip-vit-large-patch14-336"
    )
    llm: str | None = Field(default=None, description="any AutoModelForCausalLM (hub id or local dir)")
    tokenizer: str | None = Field(default=None, description="defaults to the llm's own tokenizer")
    init_from: str | None = Field(
        default=None,
        description="a student saved by an earlier stage (its output_dir): weights, tokenizer and image processor "
        "come from there and vision/llm/tokenizer must be unset; its task tokens stay in the sequence",
    )
    vision_feature_layer: int = -2
    image_token: str = "<image>"
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict,
        description="store teacher name -> task settings: the tasks trained with the embedding losses; {} = "
        "next-token loss only (VPT/IFT)",
    )
    task_order: list[str] | None = Field(default=None, description="order of task tokens; default gen, depth, seg")
    logit_scale_per: Literal["layer", "task"] = Field(
        default="layer", description="InfoNCE logit scale per tapped layer, or shared per task as the reference does"
    )
    trainable: list[str] = Field(
        default_factory=lambda: ["projector", "predictors", "task_tokens"],
        description="parts to train (PT: projector, predictors, task_tokens; VPT/IFT: llm, projector)",
    )

    @model_validator(mode="after")
    def _order_names_tasks(self):
        if self.task_order is not None and sorted(self.task_order) != sorted(self.tasks):
            raise ValueError(f"task_order {self.task_order} must list exactly the tasks {sorted(self.tasks)}")
        return self

    @model_validator(mode="after")
    def _one_source_of_weights(self):
        if self.init_from is not None:
            given = [k for k in ("vision", "llm", "tokenizer") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"init_from loads the whole student; unset {given} (they would be ignored)")
        elif self.vision is None or self.llm is None:
            raise ValueError("set both vision and llm (a new student) or init_from (a student from an earlier stage)")
        if not self.tasks and ("predictors" in self.trainable or "logit_scales" in self.trainable):
            raise ValueError(f"trainable {self.trainable} includes predictors/logit_scales but tasks is empty, so "
                             "no loss reaches them; drop them from trainable or add tasks")
        return self


class TrainConfig(BaseModel):
    model_config = _STRICT

    max_steps: int = Field(default=100, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    grad_accum: int = Field(default=1, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = Field(default=False, description="recompute LLM activations (trains the LLM in "
                                         "less memory)")
    log_every: int = Field(default=1, gt=0)
    trackers: list[Literal["tensorboard"]] = Field(
        default_factory=lambda: ["tensorboard"], description="accelerate trackers, logging to output_dir/tensorboard"
    )
    save_every: int = Field(default=0, ge=0, description="resumable checkpoint every N steps and at the end; 0 = none")
    keep_checkpoints: int = Field(default=2, ge=0, description="keep the newest N resumable checkpoints; 0 = all")
    resume: str = Field(
        default="auto",
        description="'auto': the newest complete checkpoint under output_dir/checkpoints that loads (one that does "
        "not is skipped with a warning; with no checkpoint at all, start fresh); 'none': start fresh; or a checkpoint "
        "directory",
    )
    record_rows: bool = Field(default=False, description="write the store rows each rank trained on to "
                              "output_dir/rows-rank{R}.json")
    cpu_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op CPU threads per process. A sum over another number of threads "
        "rounds differently, so a resumed run computes with the count of the run it resumes; null: that count (the "
        "checkpoint records it), or torch's count in this process for a new run"
    )


class ExperimentConfig(BaseModel):
    model_config = _STRICT

    name: str = "experiment"
    output_dir: str
    seed: int = 0
    data: DataConfig
    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _targets_need_a_store(self):
        if self.model.tasks and self.data.store is None:
            raise ValueError(f"model.tasks {sorted(self.model.tasks)} need targets: set data.store, or set "
                             "model.tasks to {} for next-token-only training")
        if self.data.online_teachers and not self.model.tasks:
            raise ValueError("data.online_teachers=true computes the targets of model.tasks, which is empty; "
                             "add tasks or set data.online_teachers=false")
        return self


def load_experiment(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override (`a.b=c`) and validate an experiment manifest; errors name file and field."""
    return load_config(path, ExperimentConfig, overrides or ())
