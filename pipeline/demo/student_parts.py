"""The student's tiny parts: a CLIP vision encoder shaped like clip-vit-large-patch14-336 and a Llama LLM whose
token ids match the demo tokenizer's."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.demo.common import clip_image_processor, prepare_dir, quiet_and_seeded
from pipeline.demo.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS


def build_tiny_student_vision(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random-initialised `CLIPVisionModel` and `CLIPImageProcessor` shaped like clip-vit-large-patch14-336.

    Hidden 32, 3 layers (the student reads the second-to-last), 2 heads, image 336, patch 14: a [B, 3, 336, 336]
    input gives hidden states [B, 577, 32] float32, i.e. 576 patch tokens after dropping [CLS].
    Returns `out_dir`.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = prepare_dir(out_dir)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",  # as the OpenAI CLIP checkpoints
    )
    with quiet_and_seeded(seed):
        CLIPVisionModel(config).eval().save_pretrained(out)
    clip_image_processor(336).save_pretrained(out)
    return out


def build_tiny_llm(
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    pad_token_id: int = SPECIAL_TOKENS.index(PAD_TOKEN),
    bos_token_id: int = SPECIAL_TOKENS.index(BOS_TOKEN),
    eos_token_id: int = SPECIAL_TOKENS.index(EOS_TOKEN),
    seed: int = 0,
) -> Path:
    """Write a random-initialised `LlamaForCausalLM`; `vocab_size` must equal `len(tokenizer)`.

    Defaults: hidden 64, MLP 128, 4 layers, 4 query heads, 2 key/value heads (grouped-query attention like
    Llama-3), 2048 positions (576 image tokens + 24 task tokens + text fit). `output_hidden_states=True` gives
    5 tensors [B, L, 64] float32 (embeddings + one per layer). The token ids default to the demo tokenizer's.
    Returns `out_dir`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = prepare_dir(out_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    with quiet_and_seeded(seed):
        LlamaForCausalLM(config).eval().save_pretrained(out)
    return out

