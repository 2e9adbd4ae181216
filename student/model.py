"""The OLA-VLM student: CLIP vision encoder + ``mlp2x_gelu`` projector + causal LLM + task tokens + predictors.

Sequence layout per sample (the image placeholder is replaced in place; nothing assumes fixed offsets):

    [text before <image>] [N image tokens] [gen x8] [depth x8] [seg x8] [text after <image>] [right padding]

Task tokens (``task_order``, 8 sequence tokens per task by default):
- ``T > 1`` (depth, seg): a parameter ``[T, H]``; the sequence gets it average-pooled in consecutive groups of
  ``T / seq_tokens``; the full ``[T, H]`` is the predictor's queries.
- ``T == 1`` (gen): a parameter ``[seq_tokens, H]`` placed in the sequence; the queries are the tapped layer's
  hidden states at those positions, averaged to one token.

Each tapped layer ``l`` (1-indexed: ``hidden_states[l]``, the output of decoder block ``l``) has a predictor that
reads that layer's states over everything except padding and the OTHER tasks' task tokens.

This module never imports ``teachers``: a student knows target shapes, not where targets come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from student.conversation import IGNORE_INDEX
from student.loading import from_pretrained_safetensors
from student.predictor import EmbeddingPredictor
from student.hf_config import StudentConfig
from student.task import TaskSpec

__all__ = ["OlaStudent", "OlaStudentOutput", "TRAINABLE_PARTS"]

# Parts addressable by ``OlaStudent.set_trainable``. The logit scales belong to the predictors' loss, so
# "predictors" includes them (the reference trains them whenever its heads train).
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision",),
    "projector": ("projector",),
    "llm": ("llm",),
    "task_tokens": ("task_tokens",),
    "predictors": ("predictors", "logit_scales"),
    "logit_scales": ("logit_scales",),
}


@dataclass
class OlaStudentOutput(ModelOutput):
    """Output of ``OlaStudent.forward``.

    Attributes:
        loss: next-token cross-entropy (float32 scalar) or None without labels.
        logits: ``[B, L', V]`` over the expanded sequence.
        predictions: ``{task: {layer: [B, T, C]}}`` (predictor dtype).
        attention_mask: ``[B, L']`` long, the expanded sequence's mask (right-padded).
        labels: ``[B, L']`` long, expanded labels (-100 on image, task tokens, padding) or None.
        task_positions: ``{task: [B, seq_tokens]}`` long, where each task's tokens sit in the expanded sequence.
        hidden_states: all LLM hidden states when ``output_hidden_states=True``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    predictions: dict[str, dict[int, torch.Tensor]] | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    task_positions: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _vision_model_class(cfg: PretrainedConfig) -> type[PreTrainedModel]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(cfg)]


class OlaStudent(PreTrainedModel):
    """LLaVA-1.5-style student with OLA-VLM task tokens and embedding predictors (see the module docstring)."""

    config_class = StudentConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: StudentConfig, vision: PreTrainedModel | None = None,
                 llm: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if config.vision_config is None or config.text_config is None:
            raise ValueError(
                "StudentConfig needs vision_config and text_config; use OlaStudent.from_parts to build one"
            )
        # ``from_parts`` hands over already-loaded sub-models; otherwise build them from their configs (their
        # weights then come from this checkpoint's state dict).
        self.vision = vision if vision is not None else AutoModel.from_config(config.vision_config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        # One config object per sub-model, so e.g. resize_token_embeddings on the LLM is what save_pretrained writes.
        self.config.vision_config = self.vision.config
        self.config.text_config = self.llm.config
        vision_hidden = config.vision_config.hidden_size
        hidden = config.text_config.hidden_size
        if config.projector_type == "mlp2x_gelu":
            self.projector = nn.Sequential(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            self.projector = nn.Sequential(nn.Linear(vision_hidden, hidden))

        self.task_tokens = nn.ParameterDict()
        self.predictors = nn.ModuleDict()
        self.logit_scales = nn.ParameterDict()
        for spec in config.task_specs():
            rows = spec.target_tokens if spec.target_tokens > 1 else spec.seq_tokens
            self.task_tokens[spec.name] = nn.Parameter(torch.empty(rows, hidden))
            dim = hidden if spec.predictor_dim == "hidden" else spec.predictor_dim
            for layer in spec.layers:
                self.predictors[f"{spec.name}_{layer}"] = EmbeddingPredictor(
                    hidden,
                    spec.target_dim,
                    dim=dim,
                    heads=config.predictor_heads,
                    head_dim=config.predictor_head_dim,
                    ff_mult=config.predictor_ff_mult,
                    depth=config.predictor_depth,
                    out_mlp=spec.out_mlp,
                )
                if config.logit_scale_per == "layer":
                    self.logit_scales[f"{spec.name}_{layer}"] = nn.Parameter(torch.empty(()))
            if config.logit_scale_per == "task":
                self.logit_scales[spec.name] = nn.Parameter(torch.empty(()))
        self.post_init()

    # ----------------------------------------------------------------------------------------------- construction
    def _init_weights(self, module: nn.Module) -> None:
        # Only our own parts: the vision encoder and the LLM initialise themselves (or arrive loaded). torch.nn.init
        # calls (not in-place tensor methods) so transformers can skip parameters already loaded from a checkpoint.
        if module is self.task_tokens:
            for p in module.values():
                nn.init.normal_(p, mean=0.0, std=self.config.task_token_init_std)
        elif module is self.logit_scales:
            for p in module.values():
                nn.init.constant_(p, self.config.logit_scale_init)
        elif isinstance(module, (nn.Linear, nn.LayerNorm)) and self._is_own(module):
            module.reset_parameters()  # PyTorch defaults, as the reference's heads and projector get

    def _is_own(self, module: nn.Module) -> bool:
        own = getattr(self, "_own_module_ids", None)
        if own is None:
            own = {id(m) for part in (self.projector, self.predictors) for m in part.modules()}
            self._own_module_ids = own
        return id(module) in own

    @classmethod
    def from_parts(
        cls,
        vision_path: str,
        llm_path: str,
        *,
        tasks: Iterable[TaskSpec | dict],
        image_token_id: int,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        vision_field: str = "vision_path",
        llm_field: str = "llm_path",
        **config_kwargs: Any,
    ) -> "OlaStudent":
        """Build a student from a pretrained vision encoder and a pretrained causal LLM (local dirs or hub ids).

        ``vision_path`` may hold a vision-only model (``CLIPVisionModel``) or a dual encoder (``CLIPModel``: its
        vision tower is loaded). Projector, task tokens, predictors and logit scales are initialised randomly from
        the current torch RNG (seed it first). ``config_kwargs`` go to ``StudentConfig``.

        The ``StudentConfig`` is built and validated from the two ``config.json`` files before any weights load (a
        bad task layer fails in a second, not after an 8B load). Weights are read from safetensors only; a path
        without them is a ``UsageError`` naming ``vision_field`` / ``llm_field`` (the trainer passes its config keys).
        """
        load_kw: dict[str, Any] = {}
        if dtype is not None:
            load_kw["dtype"] = dtype
        if attn_implementation is not None:
            load_kw["attn_implementation"] = attn_implementation
        vcfg = AutoConfig.from_pretrained(vision_path)
        vcfg = getattr(vcfg, "vision_config", None) or vcfg
        config = StudentConfig(
            vision_config=vcfg,
            text_config=AutoConfig.from_pretrained(llm_path),
            tasks=tasks,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        vision = from_pretrained_safetensors(_vision_model_class(vcfg), vision_path, field=vision_field, **load_kw)
        llm = from_pretrained_safetensors(AutoModelForCausalLM, llm_path, field=llm_field, **load_kw)
        # The config keeps the loaded parts' own sub-configs (``__init__`` shares them), as if built from them.
        model = cls(config, vision=vision, llm=llm)
        # Wrapping the loaded parts resets their attention backend to unset (eager, with a warning): restore it.
        model.set_attn_implementation(attn_implementation or model.config._attn_implementation)
        if dtype is not None:
            model.to(dtype)
        return model

    # ------------------------------------------------------------------------------------------------ parameters
    def set_trainable(self, parts: Iterable[str]) -> list[str]:
        """Train exactly ``parts`` (names from ``TRAINABLE_PARTS``); freeze the rest.

        Returns the names of the trainable parameters. PT: ``["projector", "predictors", "task_tokens"]``.
        """
        parts = list(parts)
        unknown = [p for p in parts if p not in TRAINABLE_PARTS]
        if unknown:
            raise ValueError(f"unknown trainable parts {unknown}; known: {sorted(TRAINABLE_PARTS)}")
        self.requires_grad_(False)
        for part in parts:
            for attr in TRAINABLE_PARTS[part]:
                getattr(self, attr).requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    # ----------------------------------------------------------------------------------------------------- forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, 3, H, W]`` -> projected image tokens ``[B, N, hidden]`` (CLS dropped for "patch")."""
        vision_dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=pixel_values.to(vision_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select == "patch":
            feats = feats[:, 1:]
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def task_sequence_tokens(self) -> torch.Tensor:
        """The task tokens as they enter the sequence: ``[sum(seq_tokens), hidden]`` in ``task_order``."""
        pieces = []
        for spec in self.config.task_specs():
            p = self.task_tokens[spec.name]
            if spec.target_tokens > 1:
                p = p.view(spec.seq_tokens, spec.target_tokens // spec.seq_tokens, -1).mean(dim=1)
            pieces.append(p)
        if not pieces:
            return self.projector[0].weight.new_zeros(0, self.config.text_config.hidden_size)
        return torch.cat(pieces, dim=0)

    def _expand(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Splice image and task tokens in place of each row's image placeholder and right-pad.

        Returns ``inputs_embeds [B, L', H]``, ``attention_mask [B, L']`` long, ``labels [B, L']`` or None, and
        ``task_positions {task: LongTensor[B, seq_tokens]}`` (absolute positions in the expanded sequence; meaningless
        for a text-only row, which has no task tokens).
        """
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("StudentConfig.image_token_id is not set; pass image_token_id= to OlaStudent.from_parts")
        embed = self.llm.get_input_embeddings()
        is_image = input_ids == image_token_id
        # The placeholder is never looked up, so its id may lie outside the vocabulary.
        text_embeds = embed(input_ids.masked_fill(is_image, 0))
        task_seq = self.task_sequence_tokens().to(text_embeds.dtype)
        image_embeds = image_embeds.to(text_embeds.dtype)
        specs = self.config.task_specs()
        offsets, off = {}, 0
        for spec in specs:
            offsets[spec.name] = off
            off += spec.seq_tokens

        keep = attention_mask.bool()
        seqs, labs, image_starts = [], [], []
        for b in range(input_ids.shape[0]):
            ids_b = input_ids[b][keep[b]]
            where = (ids_b == image_token_id).nonzero().flatten()
            emb_b = text_embeds[b][keep[b]]
            lab_b = labels[b][keep[b]] if labels is not None else None
            if where.numel() == 0:
                # A text-only sample: no image and no task tokens. The empty slices keep the image path in the
                # graph, as LLaVA does, so a batch without any image still gives the projector a (zero) gradient
                # and DDP/FSDP find every trainable parameter used.
                seqs.append(torch.cat([emb_b, image_embeds[b][:0], task_seq[:0]], dim=0))
                image_starts.append(0)
                if lab_b is not None:
                    labs.append(lab_b)
                continue
            if where.numel() != 1:
                raise ValueError(
                    f"row {b} of input_ids has {where.numel()} image tokens (id {image_token_id}); each row must "
                    f"contain one, or none for a text-only sample"
                )
            p = int(where.item())
            seqs.append(torch.cat([emb_b[:p], image_embeds[b], task_seq, emb_b[p + 1:]], dim=0))
            image_starts.append(p)
            if lab_b is not None:
                fill = lab_b.new_full((image_embeds.shape[1] + task_seq.shape[0],), IGNORE_INDEX)
                labs.append(torch.cat([lab_b[:p], fill, lab_b[p + 1:]]))

        lengths = [s.shape[0] for s in seqs]
        max_len = max(lengths)
        bsz, hidden = len(seqs), text_embeds.shape[-1]
        inputs_embeds = text_embeds.new_zeros(bsz, max_len, hidden)
        new_mask = attention_mask.new_zeros(bsz, max_len, dtype=torch.long)
        new_labels = None if labels is None else labels.new_full((bsz, max_len), IGNORE_INDEX)
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            inputs_embeds[b, :n] = s
            new_mask[b, :n] = 1
            if new_labels is not None:
                new_labels[b, :n] = labs[b]
        starts = torch.tensor(image_starts, device=input_ids.device) + image_embeds.shape[1]
        task_positions = {
            spec.name: starts[:, None] + offsets[spec.name] + torch.arange(spec.seq_tokens, device=input_ids.device)
            for spec in specs
        }
        return inputs_embeds, new_mask, new_labels, task_positions

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        compute_predictions: bool = True,
        **llm_kwargs: Any,
    ) -> OlaStudentOutput:
        """Run the student.

        Args:
            pixel_values: ``[B, 3, H, W]`` float, preprocessed for the vision encoder.
            input_ids: ``[B, L]`` long; each row holds one ``config.image_token_id``, or none for a text-only sample
                (whose ``pixel_values`` row is then ignored).
            attention_mask: ``[B, L]`` (1 = token). Padding may be on either side; the output is right-padded.
            labels: ``[B, L]`` long with -100 where no loss applies, or None.
            output_hidden_states: also return every LLM hidden state.
            compute_predictions: False skips the predictors (next-token-only stages): ``predictions`` is ``{}``
                and the LLM keeps no hidden states unless asked to.
            llm_kwargs: passed to the LLM's forward.

        Returns:
            ``OlaStudentOutput`` (``loss`` is the next-token loss only; combine with ``student.loss.coupled_loss``).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if compute_predictions and self.config.task_specs():
            text_only = ~(input_ids == self.config.image_token_id).any(dim=1)
            if bool(text_only.any()):
                raise ValueError(f"rows {text_only.nonzero().flatten().tolist()} have no image, so no task tokens "
                                 "to predict embeddings from; leave text-only samples out of stages with targets")
        image_embeds = self.encode_images(pixel_values)
        inputs_embeds, mask, new_labels, task_positions = self._expand(
            image_embeds, input_ids, attention_mask, labels
        )
        # A KV cache is only useful for generation; in training it would just hold memory.
        llm_kwargs.setdefault("use_cache", False)
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            output_hidden_states=compute_predictions or output_hidden_states,
            return_dict=True,
            **llm_kwargs,
        )
        hidden_states = out.hidden_states
        logits = out.logits

        loss = None
        if new_labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = new_labels[:, 1:].reshape(-1).to(logits.device)
            if (shift_labels != IGNORE_INDEX).any():
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
            else:  # all-masked batch: a zero that still reaches the graph (no NaN, no DDP hang)
                loss = shift_logits.sum() * 0.0

        predictions = (self.predict_from_hidden_states(hidden_states, mask, task_positions)
                       if compute_predictions else {})
        return OlaStudentOutput(
            loss=loss,
            logits=logits,
            predictions=predictions,
            attention_mask=mask,
            labels=new_labels,
            task_positions=task_positions,
            hidden_states=hidden_states if output_hidden_states else None,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Answer a prompt about an image: image and task tokens spliced in, then the LLM's ``generate``.

        Args:
            pixel_values: ``[B, 3, H, W]``; input_ids: ``[B, L]`` long with one image token per row (the prompt,
                ending in the chat template's generation prompt); attention_mask: ``[B, L]`` or None.
            generate_kwargs: for ``llm.generate`` (``max_new_tokens``, ``do_sample``, ...).

        Returns:
            ``[B, N]`` long: the new tokens only (``inputs_embeds`` generation returns no prompt ids).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask, _, _ = self._expand(self.encode_images(pixel_values), input_ids, attention_mask, None)
        # The expansion right-pads, but generation appends after the last position of every row: move the
        # padding to the left.
        lengths = mask.sum(dim=1)
        left_embeds, left_mask = torch.zeros_like(embeds), torch.zeros_like(mask)
        for b, n in enumerate(lengths.tolist()):
            left_embeds[b, embeds.shape[1] - n:] = embeds[b, :n]
            left_mask[b, embeds.shape[1] - n:] = 1
        return self.llm.generate(inputs_embeds=left_embeds, attention_mask=left_mask, **generate_kwargs)

    def predict_from_hidden_states(
        self,
        hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
        attention_mask: torch.Tensor,
        task_positions: dict[str, torch.Tensor],
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Run every predictor on LLM hidden states of an expanded sequence.

        Args:
            hidden_states: ``hidden_states[l]`` is ``[B, L', H]`` (index 0 = embeddings), as the LLM returns them.
            attention_mask: ``[B, L']`` of the expanded sequence (``OlaStudentOutput.attention_mask``).
            task_positions: ``OlaStudentOutput.task_positions``.

        Returns:
            ``{task: {layer: [B, T, C]}}``. A task's predictor reads its layer over every real position except the
            other tasks' task tokens.
        """
        specs = self.config.task_specs()
        mask = attention_mask.bool()
        predictions: dict[str, dict[int, torch.Tensor]] = {}
        for spec in specs:
            context_mask = mask.clone()
            for other in specs:
                if other.name != spec.name:
                    context_mask.scatter_(1, task_positions[other.name], False)
            pos = task_positions[spec.name]
            predictions[spec.name] = {}
            for layer in spec.layers:
                if layer >= len(hidden_states):
                    raise ValueError(
                        f"task {spec.name!r} taps layer {layer} but the LLM returned {len(hidden_states)} hidden "
                        f"states (valid layers: 1..{len(hidden_states) - 1})"
                    )
                hs = hidden_states[layer]
                if spec.target_tokens > 1:
                    queries = self.task_tokens[spec.name].unsqueeze(0).expand(hs.shape[0], -1, -1)
                else:
                    idx = pos[..., None].expand(-1, -1, hs.shape[-1])
                    queries = hs.gather(1, idx).mean(dim=1, keepdim=True)
                predictions[spec.name][layer] = self.predictors[f"{spec.name}_{layer}"](queries, hs, context_mask)
        return predictions


# So that AutoModel.from_pretrained(checkpoint) builds an OlaStudent without naming this class.
AutoModel.register(StudentConfig, OlaStudent, exist_ok=True)
