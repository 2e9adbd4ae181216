"""The coupled objective against an independent, loop-based computation written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student.loss import LossConfig, coupled_loss

SHAPES = {"depth": (16, 12), "gen": (1, 10)}
LAYERS = {"depth": [2, 4], "gen": [2, 4]}


def make_inputs(batch: int = 4, seed: int = 0, target_dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    preds = {t: {l: torch.randn(batch, *SHAPES[t], generator=gen, requires_grad=True) for l in LAYERS[t]}
             for t in SHAPES}
    targets = {t: torch.randn(batch, *SHAPES[t], generator=gen).to(target_dtype) for t in SHAPES}
    valid = {t: torch.ones(batch, dtype=torch.bool) for t in SHAPES}
    scales = {f"{t}_{l}": torch.tensor(2.0 + 0.1 * l, requires_grad=True) for t in SHAPES for l in LAYERS[t]}
    return preds, targets, valid, scales


def reference_total(lm, preds, targets, valid, scales, keys_extra=None, cw=0.3, lw=0.5, beta=1.0, cap=100.0,
                    task_weights=None):
    """Straightforward per-sample loops: smooth-L1 over valid samples, InfoNCE rows over valid keys."""
    total = lm
    for task, per_layer in preds.items():
        rows = [i for i in range(len(valid[task])) if valid[task][i]]
        task_loss = 0.0
        for layer, pred in per_layer.items():
            tgt = targets[task].float()
            if rows:
                sl1 = sum(F.smooth_l1_loss(pred[i].float(), tgt[i], beta=beta) for i in rows) / len(rows)
                keys = [tgt[i].flatten() for i in rows]
                if keys_extra is not None:
                    keys += [k.float().flatten() for k in keys_extra[task]]
                key_mat = F.normalize(torch.stack(keys), dim=-1)
                s = min(math.exp(float(scales[f"{task}_{layer}"].detach())), cap)
                nce = 0.0
                for j, i in enumerate(rows):
                    logits = s * (F.normalize(pred[i].flatten(), dim=0) @ key_mat.t())
                    nce = nce + F.cross_entropy(logits[None], torch.tensor([j]))
                nce = nce / len(rows)
            else:
                sl1 = nce = torch.tensor(0.0)
            task_loss = task_loss + lw * (sl1 + cw * nce)
        total = total + (task_weights or {}).get(task, 1.0) * task_loss
    return total


def test_parity_with_an_independent_computation():
    preds, targets, valid, scales = make_inputs()
    valid["depth"][2] = False
    lm = torch.tensor(1.7)
    total, terms = coupled_loss(lm, preds, targets, valid, scales, LossConfig())
    expected = reference_total(lm, preds, targets, valid, scales)
    torch.testing.assert_close(total, expected.float(), rtol=1e-5, atol=1e-5)
    assert total.dtype == torch.float32
    for key in ("lm", "depth", "gen", "total", "depth/num_valid", "depth_2/smooth_l1", "depth_2/infonce",
                "depth_4/infonce", "gen_4/smooth_l1", "gen_2/logit_scale"):
        assert key in terms, key
    assert terms["depth/num_valid"] == 3
    torch.testing.assert_close(terms["lm"] + terms["depth"] + terms["gen"], total.detach())


def test_weights_and_cap_are_applied():
    preds, targets, valid, scales = make_inputs()
    scales["depth_2"] = torch.tensor(6.0)  # exp(6) = 403 > 100: capped
    cfg = LossConfig(contrastive_weight=0.7, layer_weight=0.25, lm_weight=1.0)
    total, terms = coupled_loss(torch.tensor(0.5), preds, targets, valid, scales, cfg, task_weights={"gen": 2.0})
    expected = reference_total(torch.tensor(0.5), preds, targets, valid, scales, cw=0.7, lw=0.25,
                               task_weights={"gen": 2.0})
    torch.testing.assert_close(total, expected.float(), rtol=1e-5, atol=1e-5)
    assert terms["depth_2/logit_scale"] == 100.0


def test_an_invalid_sample_contributes_nothing():
    preds, targets, valid, scales = make_inputs()
    valid["depth"][1] = False
    total, _ = coupled_loss(None, preds, targets, valid, scales)
    changed = {k: v.clone() for k, v in targets.items()}
    changed["depth"][1] = torch.full_like(changed["depth"][1], float("nan"))
    total2, _ = coupled_loss(None, preds, changed, valid, scales)
    assert torch.equal(total, total2)
    total.backward()
    for layer in LAYERS["depth"]:
        assert torch.all(preds["depth"][layer].grad[1] == 0)  # its prediction gets no gradient either
        assert torch.any(preds["depth"][layer].grad[0] != 0)


def test_all_invalid_task_is_exactly_zero_and_stays_in_the_graph():
    preds, targets, valid, scales = make_inputs()
    valid["gen"][:] = False
    targets["gen"][:] = float("nan")
    total, terms = coupled_loss(None, preds, targets, valid, scales)
    assert terms["gen"] == 0.0 and terms["gen/num_valid"] == 0
    assert terms["gen_2/smooth_l1"] == 0.0 and terms["gen_2/infonce"] == 0.0
    total.backward()
    for layer in LAYERS["gen"]:
        grad = preds["gen"][layer].grad
        assert grad is not None and torch.all(grad == 0)  # reached (DDP sees it) and zero
    assert torch.isfinite(total)


def test_targets_gathered_from_other_ranks_are_extra_negatives():
    preds, targets, valid, scales = make_inputs(batch=3)
    other = make_inputs(batch=3, seed=1)[1]  # rank 1's targets
    other_valid = torch.tensor([True, False, True])

    def gather(packed):  # this is rank 0 of 2: [own rows; rank 1's rows], as accelerator.gather returns them
        theirs = {}
        for task in SHAPES:
            if packed.shape[1] == SHAPES[task][0] * SHAPES[task][1] + 1:
                keys = F.normalize(other[task].float().flatten(1), dim=-1)
                keys = torch.where(other_valid[:, None], keys, torch.zeros(()))
                theirs = torch.cat([keys, other_valid.float()[:, None]], dim=1)
        return torch.cat([packed, theirs])

    total, _ = coupled_loss(None, preds, targets, valid, scales, gather=gather)
    extra = {t: [other[t][i] for i in range(3) if other_valid[i]] for t in SHAPES}
    expected = reference_total(torch.tensor(0.0), preds, targets, valid, scales, keys_extra=extra)
    torch.testing.assert_close(total, expected.float(), rtol=1e-5, atol=1e-5)
    alone, _ = coupled_loss(None, preds, targets, valid, scales)
    assert not torch.allclose(total, alone)


@pytest.mark.parametrize("batch, world", [(3, 1), (3, 4), (32, 8)])
def test_each_infonce_sees_the_micro_batch_of_every_rank_as_keys(batch, world):
    # Predictions orthogonal to every target give all-equal logits, so InfoNCE = log(number of keys) exactly.
    onehot = torch.eye(batch * world + 1)
    per_rank = onehot[:-1].reshape(world, batch, 1, -1)  # rank r's targets, one distinct unit vector each

    def gather(packed):  # this is rank 0: its own rows, then the other ranks' rows, as accelerator.gather returns
        others = [torch.cat([per_rank[r].flatten(1), torch.ones(batch, 1)], dim=1) for r in range(1, world)]
        return torch.cat([packed, *others])

    preds = {"depth": {1: onehot[-1:].expand(batch, 1, -1)}}
    _, terms = coupled_loss(None, preds, {"depth": per_rank[0]}, {"depth": torch.ones(batch, dtype=torch.bool)},
                            {"depth": torch.tensor(0.0)}, gather=gather)
    assert math.exp(float(terms["depth_1/infonce"])) == pytest.approx(batch * world, rel=1e-5)


def test_a_scale_shared_per_task_weighs_each_of_its_layers_and_bf16_targets_train_it():
    preds, targets, valid, per_layer = make_inputs(target_dtype=torch.bfloat16)
    same = {key: torch.tensor(2.0) for key in per_layer}
    shared = {task: torch.tensor(2.0, requires_grad=True) for task in SHAPES}
    a, _ = coupled_loss(None, preds, targets, valid, same)
    b, _ = coupled_loss(None, preds, targets, valid, shared)
    assert torch.equal(a, b)
    b.backward()
    assert shared["depth"].grad is not None and shared["depth"].grad != 0


def test_shape_mismatch_and_missing_task_are_clear_errors():
    preds, targets, valid, scales = make_inputs()
    with pytest.raises(KeyError, match="gen"):
        coupled_loss(None, preds, {"depth": targets["depth"]}, valid, scales)
    targets["depth"] = targets["depth"][:, :8]
    with pytest.raises(ValueError, match="target_tokens"):
        coupled_loss(None, preds, targets, valid, scales)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="layer_weight"):
        LossConfig(layer_weight=-1)
