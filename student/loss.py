"""The coupled objective of OLA-VLM, in one place.

    total = lm_weight * L_lm + sum_task task_weight[task] * L_task
    L_task = sum_{layer in task} layer_weight * (L_sl1(layer) + contrastive_weight * L_nce(layer))

- ``L_sl1``: ``smooth_l1(pred, target, beta)`` averaged over the elements of VALID samples only.
- ``L_nce``: one-directional InfoNCE, predictions (queries) against targets (keys): flattened, L2-normalised,
  ``logits = min(exp(logit_scale), cap) * cos``, cross-entropy with each sample's own target as the positive.
  Keys are gathered across ranks with ``gather``; invalid rows are neither queries nor keys.

Keys per InfoNCE = micro-batch size x data-parallel processes: each call gathers the targets of the micro-batch in
hand, so gradient accumulation adds steps, not keys. The reference gathers 32 samples on each of 8 GPUs with no
accumulation: 256 keys (``olavlm_pt.yaml`` matches it); 16 per process x 2 accumulated micro-batches would give 128.

Everything is computed in float32 (targets arrive as float16/bfloat16 from the store).

Unlike the reference, a sample's loss is masked only when its target is invalid: the reference zeroes its masks
(``mask.zero_()``) right before using them, which switches its embedding losses off. That bug is not reproduced.
A task with no valid sample in the batch contributes exactly zero but stays attached to the autograd graph, so every
DDP rank reduces the same set of gradients and nothing hangs.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LossConfig", "coupled_loss", "masked_smooth_l1", "masked_infonce"]

# Masked keys get this logit instead of -inf: |scale * cos| <= cap (100), so exp(-1e4 - max) is 0 in float32, and a
# row whose keys are all masked keeps finite gradients (an all -inf row gives NaN even when multiplied by zero).
_MASKED_LOGIT = -1.0e4


class LossConfig(BaseModel):
    """Weights of the coupled objective, the manifest's ``loss:`` section (defaults: the paper's PT stage). Each
    task's own weight is its ``model.tasks.<task>.weight``; ``coupled_loss`` takes those as ``task_weights``."""

    model_config = ConfigDict(extra="forbid")

    lm_weight: float = Field(default=1.0, ge=0, description="weight of the next-token loss")
    smooth_l1_beta: float = Field(default=1.0, gt=0, description="beta of smooth-L1")
    contrastive_weight: float = Field(default=0.3, ge=0, description="weight of InfoNCE next to smooth-L1 within a "
                                      "layer; 0 drops InfoNCE (the reference's use_contrastive=False)")
    layer_weight: float = Field(default=0.5, ge=0, description="weight of each tapped layer's loss within its task")
    logit_scale_max: float = Field(default=100.0, gt=0, description="cap on exp(logit_scale)")


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 averaged over the elements of valid samples.

    Args:
        pred: ``[B, T, C]`` (any float dtype), target: ``[B, T, C]``, valid: ``[B]`` bool.

    Returns:
        float32 scalar; exactly 0 (still attached to ``pred``) when no sample is valid.
    """
    pred = pred.float()
    v = valid[:, None, None]
    # Invalid rows may hold anything (fill values, NaN): replace them before they reach any arithmetic.
    target = torch.where(v, target.float(), pred.detach())
    per_sample = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").flatten(1).mean(dim=1)
    per_sample = torch.where(valid, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum() / valid.sum().clamp(min=1)


def _normalized_keys(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` targets -> ``[B, T*C]`` float32 unit vectors; invalid rows become zero vectors."""
    keys = torch.where(valid[:, None, None], target.float(), torch.zeros((), device=target.device))
    return F.normalize(keys.flatten(1), dim=-1)


def masked_infonce(
    pred: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    own_keys: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    scale_max: float,
) -> torch.Tensor:
    """One-directional InfoNCE of predictions against (gathered) targets.

    Args:
        pred: ``[B, T, C]`` local predictions (queries).
        keys: ``[K, T*C]`` float32 unit-norm targets of all ranks (K = world * B); includes the local rows.
        key_valid: ``[K]`` bool.
        own_keys: ``[B, T*C]`` the local rows of ``keys`` (each query's positive).
        valid: ``[B]`` bool, which local rows are queries.
        logit_scale: scalar parameter; the logits use ``min(exp(logit_scale), scale_max)``.

    Returns:
        float32 scalar: mean cross-entropy over valid queries; exactly 0 (attached) when none is valid.

    The positive logit is computed locally, so no rank index is needed: cross-entropy with the own target as label
    equals ``logsumexp(all valid keys) - positive`` as long as the own target is among the keys exactly once.
    """
    scale = logit_scale.float().exp().clamp(max=scale_max)
    q = F.normalize(pred.float().flatten(1), dim=-1)
    logits = scale * (q @ keys.t())
    logits = logits.masked_fill(~key_valid[None, :], _MASKED_LOGIT)
    positive = scale * (q * own_keys).sum(dim=-1)
    per_query = torch.logsumexp(logits, dim=-1) - positive
    per_query = torch.where(valid, per_query, torch.zeros_like(per_query))
    return per_query.sum() / valid.sum().clamp(min=1)


def _scale_for(logit_scales: Mapping, task: str, layer: int) -> torch.Tensor:
    """The model's scale for a tapped layer: `"<task>_<layer>"`, or `"<task>"` when shared per task."""
    for key in (f"{task}_{layer}", task):
        if key in logit_scales:
            return logit_scales[key]
    raise KeyError(f"no logit scale for task {task!r} layer {layer}; have {sorted(logit_scales)}")


def coupled_loss(
    lm_loss: torch.Tensor | None,
    predictions: Mapping[str, Mapping[int, torch.Tensor]],
    targets: Mapping[str, torch.Tensor],
    valid: Mapping[str, torch.Tensor],
    logit_scales: Mapping[str, Mapping[int, torch.Tensor] | torch.Tensor],
    cfg: LossConfig | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one batch and every term separately.

    Args:
        lm_loss: next-token loss (scalar) or None (then no LM term).
        predictions: ``{task: {layer: [B, T, C]}}`` from ``OlaStudent`` (any float dtype).
        targets: ``{task: [B, T, C]}`` float16/bfloat16/float32 teacher targets.
        valid: ``{task: [B]}`` bool (or 0/1), False where the store has no target for the row.
        logit_scales: ``OlaStudent.logit_scales``: scalars keyed ``"<task>_<layer>"``, or ``"<task>"`` when
            shared per task.
        cfg: weights; ``LossConfig()`` when None.
        gather: concatenates a tensor's rows across data-parallel ranks in rank order (e.g.
            ``accelerator.gather``); identity when None. Per-rank batch sizes must match, or the callable must pad
            with zero rows (a zero row reads as invalid). Called once per task, on ``[B, T*C + 1]`` float32.
        task_weights: ``{task: weight}`` (the manifest's ``model.tasks.<task>.weight``); an unlisted task weighs 1.

    Returns:
        ``(total, terms)``: ``total`` float32 scalar with graph; ``terms`` detached float32 scalars: ``"lm"``,
        ``"<task>"`` (weighted task loss as added to the total), ``"<task>/num_valid"``,
        ``"<task>_<layer>/smooth_l1"``, ``"<task>_<layer>/infonce"``, ``"<task>_<layer>/logit_scale"`` (the
        clamped ``exp``), and ``"total"``.
    """
    cfg = cfg or LossConfig()
    task_weights = task_weights or {}
    missing = sorted(set(predictions) - set(targets)) + sorted(set(predictions) - set(valid))
    if missing:
        raise KeyError(f"no targets/valid flags for predicted tasks {sorted(set(missing))}; the batch has "
                       f"targets for {sorted(targets)}")
    terms: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    if lm_loss is not None:
        lm = lm_loss.float()
        terms["lm"] = lm.detach()
        total = cfg.lm_weight * lm

    for task, per_layer in predictions.items():
        first = next(iter(per_layer.values()))
        device = first.device
        target = targets[task].to(device)
        ok = valid[task].to(device=device, dtype=torch.bool).flatten()
        if target.shape[0] != ok.shape[0] or target.shape[0] != first.shape[0]:
            raise ValueError(
                f"task {task!r}: batch sizes differ: predictions {tuple(first.shape)}, targets "
                f"{tuple(target.shape)}, valid {tuple(ok.shape)}"
            )
        terms[f"{task}/num_valid"] = ok.sum().float()

        if cfg.contrastive_weight > 0:
            # Targets are the same for every layer of a task: normalise and gather them once.
            own_keys = _normalized_keys(target, ok)
            packed = torch.cat([own_keys, ok.float()[:, None]], dim=1)
            packed = gather(packed) if gather is not None else packed
            keys, key_valid = packed[:, :-1], packed[:, -1] > 0.5

        task_loss = first.new_zeros((), dtype=torch.float32)
        for layer, pred in per_layer.items():
            if tuple(pred.shape) != tuple(target.shape):
                raise ValueError(
                    f"task {task!r} layer {layer}: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}; "
                    f"the student's target_tokens/target_dim must match the store"
                )
            key = f"{task}_{layer}"
            sl1 = masked_smooth_l1(pred, target, ok, cfg.smooth_l1_beta)
            layer_loss = sl1
            terms[f"{key}/smooth_l1"] = sl1.detach()
            if cfg.contrastive_weight > 0:
                scale = _scale_for(logit_scales, task, layer)
                nce = masked_infonce(pred, keys, key_valid, own_keys, ok, scale, cfg.logit_scale_max)
                layer_loss = layer_loss + cfg.contrastive_weight * nce
                terms[f"{key}/infonce"] = nce.detach()
                terms[f"{key}/logit_scale"] = scale.detach().float().exp().clamp(max=cfg.logit_scale_max)
            task_loss = task_loss + cfg.layer_weight * layer_loss
        weighted = task_weights.get(task, 1.0) * task_loss
        terms[task] = weighted.detach()
        total = weighted if total is None else total + weighted

    if total is None:
        raise ValueError("coupled_loss got neither an lm_loss nor any predictions")
    terms["total"] = total.detach()
    return total, terms
