"""EmbeddingPredictor: shapes, masking, and the reference's resampler structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student.predictor import EmbeddingPredictor


@pytest.fixture
def predictor():
    torch.manual_seed(0)
    return EmbeddingPredictor(64, 12).eval()


@pytest.mark.parametrize("queries,out_mlp,dim", [(16, False, None), (1, False, None), (16, True, 64)])
def test_output_shape_and_dtype(queries, out_mlp, dim):
    torch.manual_seed(0)
    p = EmbeddingPredictor(64, 12, dim=dim, out_mlp=out_mlp)
    out = p(torch.randn(3, queries, 64), torch.randn(3, 9, 64), torch.ones(3, 9, dtype=torch.bool))
    assert out.shape == (3, queries, 12) and out.dtype == torch.float32


def test_structure_follows_reference_defaults(predictor):
    attn, ff = predictor.blocks[0]
    assert len(predictor.blocks) == 1
    assert attn.to_q.out_features == 4 * 32 and attn.to_kv.out_features == 2 * 4 * 32
    assert ff[1].out_features == predictor.dim == 12  # ff multiplier 1; width = target channels by default
    assert predictor.proj_in.in_features == 64 and predictor.norm_out.normalized_shape == (12,)


def test_masked_context_positions_do_not_influence_the_output(predictor):
    torch.manual_seed(1)
    queries, context = torch.randn(2, 16, 64), torch.randn(2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, [0, 4]] = False
    ref = predictor(queries, context, mask)
    poisoned = context.clone()
    poisoned[~mask] = float("nan")
    assert torch.equal(predictor(queries, poisoned, mask), ref)
    assert not torch.allclose(predictor(queries, context), ref)  # the mask really removes something


def test_unmasked_context_does_influence_the_output(predictor):
    queries, context = torch.randn(1, 16, 64), torch.randn(1, 10, 64)
    mask = torch.ones(1, 10, dtype=torch.bool)
    changed = context.clone()
    changed[0, 3] += 1.0
    assert not torch.allclose(predictor(queries, context, mask), predictor(queries, changed, mask))


def test_fully_masked_context_is_finite(predictor):
    out = predictor(torch.randn(2, 16, 64), torch.randn(2, 5, 64), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_samples_are_independent(predictor):
    queries, context = torch.randn(3, 16, 64), torch.randn(3, 10, 64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    batched = predictor(queries, context, mask)
    alone = predictor(queries[1:2], context[1:2], mask[1:2])
    torch.testing.assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-6)


def _with_and_without_out_mlp():
    """A predictor with the output MLP, and the same predictor without it (shared weights elsewhere)."""
    torch.manual_seed(2)
    with_mlp = EmbeddingPredictor(64, 12, dim=64, out_mlp=True).eval()
    without = EmbeddingPredictor(64, 12, dim=64).eval()
    without.load_state_dict({k: v for k, v in with_mlp.state_dict().items() if not k.startswith("out_mlp.")})
    return with_mlp, without


def test_out_mlp_is_the_reference_depth_heads_linear_relu_linear():
    with_mlp, without = _with_and_without_out_mlp()
    assert [type(m) for m in with_mlp.out_mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    queries, context = torch.randn(2, 16, 64), torch.randn(2, 9, 64)
    first, _, second = with_mlp.out_mlp
    hidden = without(queries, context) @ first.weight.t() + first.bias
    expected = hidden.clamp(min=0) @ second.weight.t() + second.bias
    torch.testing.assert_close(with_mlp(queries, context), expected, rtol=1e-5, atol=1e-6)


def test_out_mlp_zeroes_negative_pre_activations():
    # Identity layers leave only the activation: ReLU passes positives unchanged and zeroes every negative channel
    # of the LayerNorm output (GELU would give small negative values there).
    with_mlp, without = _with_and_without_out_mlp()
    with torch.no_grad():
        for linear in (with_mlp.out_mlp[0], with_mlp.out_mlp[2]):
            linear.weight.copy_(torch.eye(12))
            linear.bias.zero_()
    queries, context = torch.randn(2, 16, 64), torch.randn(2, 9, 64)
    before, after = without(queries, context), with_mlp(queries, context)
    negative = before < 0
    assert negative.any() and (~negative).any()
    assert torch.equal(after[negative], torch.zeros_like(after[negative]))
    assert torch.equal(after[~negative], before[~negative])
