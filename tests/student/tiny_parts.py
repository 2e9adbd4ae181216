"""Tiny real parts for the student tests: configs, a student builder, chat templates (no hub, no mocks)."""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 299  # inside the tiny LLM's vocabulary (300) on purpose: it must still never be embedded
IMAGE_SIZE = 56  # 56 / 14 = 4 x 4 = 16 patch tokens
NUM_IMAGE_TOKENS = 16

# depth-like and seg-like: T = 16 tokens pooled to 8 sequence tokens; gen-like: one global vector.
TASKS = [
    {"name": "depth", "layers": [2, 4], "target_tokens": 16, "target_dim": 12},
    {"name": "seg", "layers": [1, 3], "target_tokens": 16, "target_dim": 20},
    {"name": "gen", "layers": [2, 4], "target_tokens": 1, "target_dim": 10},
]


def tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=14)


def tiny_text_config(vocab_size: int = 300):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def build_student(tasks=TASKS, seed: int = 0, **config_kwargs):
    from student.model import OlaStudent
    from student.hf_config import StudentConfig

    torch.manual_seed(seed)
    config_kwargs.setdefault("image_token_id", IMAGE_TOKEN_ID)
    cfg = StudentConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), tasks=tasks,
                        **config_kwargs)
    return OlaStudent(cfg).eval()


# A Llama-3-like template: BOS, role headers, content, end-of-turn marker, and "\n\n" after each header (whitespace
# that byte-level BPE may merge with the following text, which is what the offset-based labelling must survive).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|header_end|>\n\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|header_end|>\n\n{% endif %}"
)
# ChatML-like: the end-of-turn marker is followed by a newline.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "<pad>", "<image>", "<|start|>", "<|header_end|>", "<|eot|>"]
