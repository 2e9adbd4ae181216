"""The student's demo tokenizer: byte-level BPE trained on the demo texts, its special tokens and a chat template
whose assistant turns mask cleanly (see CHAT_TEMPLATE)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from pipeline.demo.common import prepare_dir
from pipeline.demo.photos import ANSWERS, FOLLOW_UPS, IMAGE_TOKEN, QUESTIONS, SOURCES

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The BPE trainer assigns ids in this order, so pad=0, bos=1, eos=2, image=3 in every demo tokenizer.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. You look at images and answer questions about them."

# Every turn closes with the eos token and nothing after it, so the assistant-only labels a student derives by
# rendering messages[:i] (with the generation prompt) and messages[:i+1] end exactly on eos. No newline follows
# a turn: byte-level BPE could merge it with the next role's text and break the token-prefix property.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
    "{{- '<|system|>\\n" + DEFAULT_SYSTEM_PROMPT + "' + eos_token -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Texts that the tokenizer should know whatever the number of demo samples.
PROMPT_TEXTS: tuple[str, ...] = (
    DEFAULT_SYSTEM_PROMPT,
    *QUESTIONS,
    *(a.format(caption="") for a in ANSWERS),
    *(text for follow_up in FOLLOW_UPS for text in follow_up),
    *(description for _, description, _ in SOURCES),
    "system user assistant",
    "0 1 2 3 4 5 6 7 8 9 by pixels wide tall small large close crop view mirrored greyscale",
)


def train_demo_tokenizer(captions: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 800) -> Path:
    """Train a byte-level BPE tokenizer on `captions` plus `PROMPT_TEXTS` and save it as a `PreTrainedTokenizerFast`.

    Special tokens (ids 0..6): `<|pad|>`, `<|bos|>`, `<|end|>` (eos, closes every chat turn), `<image>` (one id,
    where the student splices the image features), `<|system|>`, `<|user|>`, `<|assistant|>`. The saved
    `chat_template` is `CHAT_TEMPLATE`. Encoding adds no special tokens by itself; the chat template writes bos.
    `vocab_size` is an upper bound: a small corpus runs out of merges earlier. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = prepare_dir(out_dir)
    texts = [text.replace(IMAGE_TOKEN, " ") for text in (*captions, *PROMPT_TEXTS)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, *ROLE_TOKENS],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out

