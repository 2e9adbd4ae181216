"""A distillation task of the student: one teacher's targets, predicted from some of the LLM's layers.

``TaskHeadConfig`` holds what the student builds for a task (tapped layers, task tokens, predictor shape) and
validates it once. The experiment manifest extends it with a loss weight (``student.config.TaskConfig``); the
student's own ``TaskSpec`` extends it with the task's name and the teacher's target shape, which come from the store.
``StudentConfig`` saves each ``TaskSpec`` as a dict of its fields in ``config.json``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_TASK_ORDER", "REFERENCE_TASKS", "TaskHeadConfig", "TaskSpec"]

DEFAULT_TASK_ORDER = ("gen", "depth", "seg")  # the reference's order of task tokens


class TaskHeadConfig(BaseModel):
    """What the student builds for one task: the LLM layers it taps, its task tokens and its predictors' shape."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(
        min_length=1, description="tapped LLM layers, 1-indexed over hidden states (hidden_states[l]), e.g. [18, 20]"
    )
    seq_tokens: int = Field(default=8, gt=0, description="task tokens this task puts into the sequence")
    predictor_dim: int | Literal["hidden"] | None = Field(
        default=None, description="predictor width: None = target channels (reference gen/seg), 'hidden' = LLM width "
        "(reference depth), or an int"
    )
    out_mlp: bool = Field(default=False, description="extra Linear-ReLU-Linear after the predictor (reference depth)")

    @field_validator("layers")
    @classmethod
    def _one_indexed_and_distinct(cls, layers: list[int]) -> list[int]:
        if any(layer < 1 for layer in layers):
            raise ValueError(f"layers are 1-indexed hidden states after the embeddings (l >= 1), got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {layers} contain duplicates")
        return layers


class TaskSpec(TaskHeadConfig):
    """One distillation task (one teacher) of the student: its heads, plus the name and target shape ``[T, C]``.

    ``T`` must be 1 (one pooled token, such as gen) or a multiple of ``seq_tokens``: a task with ``T > 1`` gets a
    ``[T, H]`` parameter that enters the sequence average-pooled in ``seq_tokens`` equal groups.
    """

    name: str = Field(description="task name, also the teacher name in the target store (depth, seg, gen, ...)")
    target_tokens: int = Field(gt=0, description="T of the teacher target [T, C]")
    target_dim: int = Field(gt=0, description="C of the teacher target")

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not name.isidentifier():
            raise ValueError(f"task name {name!r} must be a non-empty identifier (it names modules and keys)")
        return name

    @model_validator(mode="after")
    def _tokens_pool_evenly(self):
        if self.target_tokens > 1 and self.target_tokens % self.seq_tokens:
            raise ValueError(
                f"task {self.name!r}: target_tokens={self.target_tokens} is not a multiple of "
                f"seq_tokens={self.seq_tokens}; the task-token parameter is pooled in equal groups"
            )
        return self

    @classmethod
    def of(cls, name: str, head: TaskHeadConfig, target_shape: tuple[int, int] | list[int]) -> "TaskSpec":
        """The spec of task ``name`` with ``head``'s settings (any subclass: extra fields such as a manifest's loss
        weight stay behind) and the store's ``target_shape`` ``(T, C)``."""
        tokens, dim = target_shape
        return cls(name=name, target_tokens=tokens, target_dim=dim,
                   **head.model_dump(include=set(TaskHeadConfig.model_fields)))


# The paper's setting (SHI-Labs/OLA-VLM pretrain.sh: layer_indices d18-20_s10-18_g12-20, 8 task tokens).
REFERENCE_TASKS: tuple[dict[str, Any], ...] = (
    {"name": "gen", "layers": [12, 20], "target_tokens": 1, "target_dim": 1024},
    {
        "name": "depth",
        "layers": [18, 20],
        "target_tokens": 576,
        "target_dim": 1024,
        "predictor_dim": "hidden",
        "out_mlp": True,
    },
    {"name": "seg", "layers": [10, 18], "target_tokens": 576, "target_dim": 1536},
)
