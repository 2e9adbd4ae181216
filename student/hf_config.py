"""``StudentConfig``: the Hugging Face config of ``OlaStudent``, what ``save_pretrained`` writes to ``config.json``
and ``from_pretrained`` reads back.

It stays a ``PretrainedConfig`` (not a pydantic model) because transformers serialises, loads and dispatches on
that class (``AutoConfig``, sub-configs, attention settings). Its tasks are ``student.task.TaskSpec``s, validated by
that model and saved as plain dicts of its fields, so every saved student keeps loading.
"""

from __future__ import annotations

from typing import Any, Iterable

from transformers import AutoConfig, PretrainedConfig

from student.task import DEFAULT_TASK_ORDER, TaskSpec

__all__ = ["StudentConfig", "TaskLayersError"]


class TaskLayersError(ValueError):
    """A task taps an LLM layer the LLM does not have. Raised by ``StudentConfig`` validation, so from the configs
    alone (``OlaStudent.from_parts`` builds the config before loading any weights); the trainer turns it into a
    ``UsageError`` naming ``model.tasks.<task>.layers``."""

    def __init__(self, task: str, layers: list[int], num_layers: int) -> None:
        self.task, self.layers, self.num_layers = task, list(layers), num_layers
        super().__init__(f"StudentConfig.tasks[{task!r}].layers {self.layers}: the LLM has {num_layers} layers "
                         f"(valid: 1..{num_layers})")


def _as_config(cfg: PretrainedConfig | dict | None, field_name: str) -> PretrainedConfig | None:
    if cfg is None or isinstance(cfg, PretrainedConfig):
        return cfg
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"StudentConfig.{field_name} needs a 'model_type' key (e.g. 'clip_vision_model', 'llama')")
        return AutoConfig.for_model(model_type, **cfg)
    raise TypeError(f"StudentConfig.{field_name} must be a dict or a PretrainedConfig, got {type(cfg).__name__}")


class StudentConfig(PretrainedConfig):
    """Configuration of ``OlaStudent``; saved in every checkpoint's ``config.json``.

    Args:
        vision_config: the vision encoder's config (CLIP vision), a ``PretrainedConfig`` or a dict with ``model_type``.
        text_config: the causal LLM's config, same forms.
        tasks: ``TaskSpec``s or dicts (see ``TaskSpec``); stored as a list of dicts.
        task_order: order of the task tokens after the image tokens (every task must appear; extra names ignored).
        image_token_id: the id of the single image placeholder in ``input_ids`` (it is never embedded, so it may lie
            outside the LLM vocabulary).
        vision_feature_layer: which vision hidden state feeds the projector (-2 = second-to-last, LLaVA-1.5).
        vision_feature_select: ``"patch"`` drops the CLS token, ``"full"`` keeps it.
        projector_type: ``"mlp2x_gelu"`` (LLaVA-1.5) or ``"linear"``.
        predictor_heads, predictor_head_dim, predictor_ff_mult, predictor_depth: the resampler shape (4, 32, 1, 1).
        task_token_init_std: std of the task tokens' normal init (1.0: the reference uses ``torch.randn``).
        logit_scale_init: InfoNCE logit scale init (used as ``exp(scale)``), 2.0.
        logit_scale_per: ``"layer"``: one learnable scale per (task, layer); ``"task"``: one per task shared by its
            layers, as the reference does.
    """

    model_type = "ola_student"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        tasks: Iterable[TaskSpec | dict] | None = None,
        task_order: Iterable[str] = DEFAULT_TASK_ORDER,
        image_token_id: int | None = None,
        vision_feature_layer: int = -2,
        vision_feature_select: str = "patch",
        projector_type: str = "mlp2x_gelu",
        predictor_heads: int = 4,
        predictor_head_dim: int = 32,
        predictor_ff_mult: float = 1,
        predictor_depth: int = 1,
        task_token_init_std: float = 1.0,
        logit_scale_init: float = 2.0,
        logit_scale_per: str = "layer",
        **kwargs: Any,
    ) -> None:
        # Sub-configs first: the base __init__ propagates the attention implementation into them.
        self.vision_config = _as_config(vision_config, "vision_config")
        self.text_config = _as_config(text_config, "text_config")
        specs = [TaskSpec.model_validate(t) for t in (tasks or [])]
        self.tasks = [s.model_dump() for s in specs]
        self.task_order = list(task_order)
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select = vision_feature_select
        self.projector_type = projector_type
        self.predictor_heads = predictor_heads
        self.predictor_head_dim = predictor_head_dim
        self.predictor_ff_mult = predictor_ff_mult
        self.predictor_depth = predictor_depth
        self.task_token_init_std = task_token_init_std
        self.logit_scale_init = logit_scale_init
        self.logit_scale_per = logit_scale_per
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate(specs)

    def _validate(self, specs: list[TaskSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"StudentConfig.tasks: duplicate task names {names}")
        missing = [n for n in names if n not in self.task_order]
        if missing:
            raise ValueError(
                f"StudentConfig.task_order {self.task_order} lacks tasks {missing}; list every task there"
            )
        if self.vision_feature_select not in ("patch", "full"):
            raise ValueError(f"StudentConfig.vision_feature_select must be 'patch' or 'full', got "
                             f"{self.vision_feature_select!r}")
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"StudentConfig.projector_type must be 'mlp2x_gelu' or 'linear', got "
                             f"{self.projector_type!r}")
        if self.logit_scale_per not in ("layer", "task"):
            raise ValueError(f"StudentConfig.logit_scale_per must be 'layer' or 'task', got {self.logit_scale_per!r}")
        n_layers = getattr(self.text_config, "num_hidden_layers", None)
        for s in specs:
            if n_layers is not None and max(s.layers) > n_layers:
                raise TaskLayersError(s.name, s.layers, n_layers)

    def task_names(self) -> list[str]:
        """Task names in sequence order (``task_order``)."""
        return [s.name for s in self.task_specs()]

    def task_specs(self) -> list[TaskSpec]:
        """The tasks in sequence order (``task_order``)."""
        specs = {t["name"]: TaskSpec.model_validate(t) for t in self.tasks}
        return [specs[n] for n in self.task_order if n in specs]


# So that AutoConfig.from_pretrained(checkpoint) resolves "ola_student" (student.model registers AutoModel).
AutoConfig.register(StudentConfig.model_type, StudentConfig, exist_ok=True)
