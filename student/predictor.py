"""Embedding predictor: a small Perceiver resampler that reads one LLM layer and predicts a teacher's target.

Structure (as in OLA-VLM's ``TaskTokenResampler``, depth 1, 4 heads x 32, feed-forward multiplier 1):

    latents = proj_in(queries)            # queries are task tokens (or task-token states) in LLM space
    x       = proj_in(context)            # the SAME projection is shared by queries and context
    for each block:
        latents = attn(x, latents) + latents   # queries attend over [context; latents]
        latents = ff(latents) + latents
    out = norm_out(proj_out(latents))     # LayerNorm on the output channels
    out = out_mlp(out)                    # optional (the reference's depth head; see ``out_mlp``)

The reference has no attention mask (it slices padding and other tasks' tokens away by hard-coded offsets); here a
boolean ``context_mask`` removes those positions, so a batch of different prompt lengths predicts the same as each
sample alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingPredictor", "PerceiverCrossAttention", "FeedForward"]


class FeedForward(nn.Sequential):
    """Pre-norm MLP without biases (``LayerNorm -> Linear -> GELU -> Linear``), ``[B, Q, dim] -> [B, Q, dim]``."""

    def __init__(self, dim: int, mult: float = 1.0) -> None:
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )


class PerceiverCrossAttention(nn.Module):
    """Latents attend over ``[context; latents]`` (Flamingo/IP-Adapter style Perceiver attention).

    Keys and values include the latents themselves, so every query row always has at least one key to attend to
    even when the whole context is masked: the softmax never sees an all-masked row.
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 32) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_context = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, context: torch.Tensor, latents: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """``context [B, L, dim]``, ``latents [B, Q, dim]``, ``context_mask [B, L] bool`` -> ``[B, Q, dim]``."""
        x = self.norm_context(context)
        lat = self.norm_latents(latents)
        q = self._split_heads(self.to_q(lat))
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        keep = torch.cat([context_mask, context_mask.new_ones(lat.shape[:2])], dim=1)
        # Softmax in float32 as the reference does; the tensors are small (Q x (L+Q) per head).
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=keep[:, None, None, :]
        ).to(lat.dtype)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class EmbeddingPredictor(nn.Module):
    """A 1-layer (by default) Perceiver resampler from LLM hidden states to teacher target tokens.

    Args:
        llm_hidden: LLM hidden size ``H`` (the width of queries and context).
        out_dim: target channels ``C``.
        dim: the resampler's width. ``None`` means ``out_dim``, which is what the reference uses for its gen and seg
            heads (its depth head uses ``H``; ``StudentConfig`` tasks choose per task).
        heads, head_dim, ff_mult, depth: attention heads, per-head width, feed-forward multiplier, number of blocks.
        out_mlp: append ``Linear(C, C) -> ReLU -> Linear(C, C)`` after the output LayerNorm. The reference's depth
            head trains this extra MLP's output, not the LayerNorm output: with its ``use_intermediate_depth``
            default the depth loss reads ``linear_1``, a ``build_mlp`` (Linear, ReLU, Linear) in
            ``aux_heads/da_v2_head.py``.
    """

    def __init__(
        self,
        llm_hidden: int,
        out_dim: int,
        *,
        dim: int | None = None,
        heads: int = 4,
        head_dim: int = 32,
        ff_mult: float = 1.0,
        depth: int = 1,
        out_mlp: bool = False,
    ) -> None:
        super().__init__()
        dim = out_dim if dim is None else dim
        self.llm_hidden, self.out_dim, self.dim = llm_hidden, out_dim, dim
        self.proj_in = nn.Linear(llm_hidden, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverCrossAttention(dim, heads, head_dim), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.out_mlp = (
            nn.Sequential(nn.Linear(out_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim)) if out_mlp else None
        )

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict target tokens.

        Args:
            queries: ``[B, Q, H]`` (any float dtype; cast to the predictor's dtype).
            context: ``[B, L, H]`` hidden states the queries read.
            context_mask: ``[B, L]`` bool, True = attend. ``None`` = all positions.

        Returns:
            ``[B, Q, C]`` in the predictor's dtype.
        """
        dtype = self.proj_in.weight.dtype
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        context_mask = context_mask.to(device=context.device, dtype=torch.bool)
        # Zero masked positions too: attention weight 0 times a NaN/inf value (possible in padded rows of some
        # attention kernels) would still poison the output.
        context = context.to(dtype).masked_fill(~context_mask[..., None], 0.0)
        x = self.proj_in(context)
        latents = self.proj_in(queries.to(dtype))
        for attn, ff in self.blocks:
            latents = attn(x, latents, context_mask) + latents
            latents = ff(latents) + latents
        out = self.norm_out(self.proj_out(latents))
        if self.out_mlp is not None:
            out = self.out_mlp(out)
        return out
