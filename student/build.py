"""The student an experiment trains, with its tokenizer and image processor: a new one assembled from a pretrained
vision encoder and a pretrained LLM (`model.vision`, `model.llm`), or the student an earlier stage saved
(`model.init_from`)."""

from __future__ import annotations

from pipeline.data.errors import UsageError
from student.checkpoint import load_student
from student.config import ModelConfig
from student.loading import load_image_processor
from student.model import OlaStudent
from student.hf_config import TaskLayersError
from student.task import DEFAULT_TASK_ORDER, TaskSpec


def assemble_student(cfg: ModelConfig, target_shapes: dict[str, tuple[int, int]]):
    """(model, tokenizer, image_processor) for the manifest's `model:` section.

    `target_shapes`: `{task: (T, C)}` of the store's targets, which size a new student's task tokens and predictors.
    """
    if cfg.init_from is not None:
        return _earlier_stage(cfg)
    return _new_student(cfg, target_shapes)


def task_order(cfg: ModelConfig) -> list[str]:
    """The order of the task tokens: `model.task_order`, else the reference's (gen, depth, seg), others after."""
    names = list(cfg.tasks)
    return cfg.task_order or [t for t in DEFAULT_TASK_ORDER if t in names] + [
        t for t in names if t not in DEFAULT_TASK_ORDER]


def _earlier_stage(cfg: ModelConfig):
    source = cfg.init_from
    model, tokenizer, image_processor = load_student(source, field="model.init_from")
    have = {spec.name: spec.layers for spec in model.config.task_specs()}
    for name, task in cfg.tasks.items():
        if have.get(name) != task.layers:
            raise UsageError(f"model.tasks.{name}.layers {task.layers} do not match the student in {source} "
                             f"(its tasks: {have}); the embedding losses can only train the student's own heads")
    return model, tokenizer, image_processor


def _new_student(cfg: ModelConfig, target_shapes: dict[str, tuple[int, int]]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.llm)
    if cfg.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = load_image_processor(cfg.vision)
    tasks = [TaskSpec.of(name, task, target_shapes[name]) for name, task in cfg.tasks.items()]
    try:
        model = OlaStudent.from_parts(
            cfg.vision, cfg.llm, tasks=tasks, task_order=task_order(cfg),
            image_token_id=tokenizer.convert_tokens_to_ids(cfg.image_token),
            vision_feature_layer=cfg.vision_feature_layer, logit_scale_per=cfg.logit_scale_per,
            vision_field="model.vision", llm_field="model.llm",
        )
    except TaskLayersError as exc:  # raised from the configs, before any weights load
        raise UsageError(f"model.tasks.{exc.task}.layers {exc.layers}: the LLM {cfg.llm} has {exc.num_layers} "
                         f"layers; tap layers in 1..{exc.num_layers}") from None
    if len(tokenizer) > model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(len(tokenizer))
    return model, tokenizer, image_processor
