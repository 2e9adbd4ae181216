"""Turn a sample (a caption or LLaVA conversations) into chat messages, and messages into ids and labels.

Labels are found generically, for any chat template with the prefix property: rendering ``messages[:i]`` with
``add_generation_prompt=True`` must give a string prefix of rendering ``messages[:i+1]``; the rest of that rendering
is assistant turn ``i`` (its text and its end-of-turn marker), which is the only part that gets labels. Token spans
are mapped from characters with the fast tokenizer's offsets, so a template whose generation prompt ends in
whitespace that BPE merges differently in the full text still labels exactly the assistant characters.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "IMAGE_PLACEHOLDER",
    "DEFAULT_CAPTION_PROMPT",
    "LLAVA_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "messages_from_sample",
    "tokenize_messages",
]

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
# The system prompt of the reference's llava_llama_3 template (pass ``system=LLAVA_SYSTEM_PROMPT`` to use it).
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages_from_sample(
    caption: str | None,
    conversations: Sequence[dict[str, Any]] | None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    *,
    system: str | None = None,
    image: bool = True,
) -> list[dict[str, str]]:
    """Chat messages ``[{"role", "content"}, ...]`` for one sample, with ``<image>`` exactly once (or, with
    ``image=False``, a text-only sample's, with no ``<image>`` at all).

    Args:
        caption: a bare caption, used when ``conversations`` is empty: it becomes
            ``user: "<image>\\n" + prompt`` / ``assistant: caption``.
        conversations: LLaVA turns ``{"from": "human"|"gpt", "value": str}`` (``role``/``content`` keys work too).
            A leading assistant turn is dropped (as LLaVA does); roles must then alternate user/assistant.
        prompt: the instruction paired with a bare caption.
        system: optional system message prepended to the chat.
        image: whether the sample has an image. A text-only sample (LLaVA's IFT mix has about 40K) trains as LLaVA
            trains it: its conversation as it is, with no image and no task tokens.

    The placeholder is moved to the start of the turn that holds it (``"<image>\\n" + rest``, LLaVA's rule) or, when
    absent, put at the start of the first user turn. More than one placeholder is an error.
    """
    if conversations:
        turns = []
        for i, turn in enumerate(conversations):
            who = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
            if who not in _ROLES or not isinstance(text, str):
                raise ValueError(f"conversation turn {i} {turn!r}: expected from in {sorted(_ROLES)} and a str value")
            turns.append({"role": _ROLES[who], "content": text})
        if turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
    elif caption is not None:
        turns = [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
            {"role": "assistant", "content": caption.strip()},
        ]
    else:
        raise ValueError("sample has neither a caption nor conversations")
    if not turns:
        raise ValueError("sample's conversations hold no user turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(f"conversation turn {i} is {turn['role']!r}, expected {expected!r} (turns alternate)")

    count = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    if not image:
        if count:
            raise ValueError(f"sample has no image but its conversation holds {IMAGE_PLACEHOLDER}")
        return ([{"role": "system", "content": system}] if system is not None else []) + turns
    if count > 1:
        raise ValueError(f"sample has {count} {IMAGE_PLACEHOLDER} placeholders; the student takes exactly one image")
    holder = next((t for t in turns if IMAGE_PLACEHOLDER in t["content"]), turns[0])
    rest = holder["content"].replace(IMAGE_PLACEHOLDER, "").strip()
    holder["content"] = f"{IMAGE_PLACEHOLDER}\n{rest}" if rest else IMAGE_PLACEHOLDER

    if system is not None:
        turns.insert(0, {"role": "system", "content": system})
    return turns


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def tokenize_messages(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_length: int,
    *,
    image_token: str = IMAGE_PLACEHOLDER,
    images: int = 1,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat; labels only on assistant turns (their text and end-of-turn), -100 elsewhere.

    Args:
        tokenizer: a fast tokenizer with a chat template, in which ``image_token`` is one (added) token.
        messages: from ``messages_from_sample``.
        max_length: keep at most this many text tokens (the image token counts as one); the tail is cut.
        image_token: the placeholder string.
        images: how many image tokens the chat must hold: 1, or 0 for a text-only sample.

    Returns:
        ``(input_ids, labels)``, lists of equal length ``<= max_length``; ``input_ids`` holds the image token's id
        exactly ``images`` times.

    Raises:
        ValueError: the template lacks the prefix property, the tokenizer is not fast, the image token is not a
        single token, or truncation would cut the image token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_messages needs a fast tokenizer (character offsets map labels to tokens)")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"{image_token!r} is not a token of this tokenizer; add it as a special token first")

    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ValueError(
                f"the chat template does not render messages[:{i}] + generation prompt as a prefix of "
                f"messages[:{i + 1}] (or that as a prefix of the whole chat); labels cannot be located generically. "
                f"Use a template with this prefix property."
            )
        spans.append((len(prefix), len(upto)))

    # The template writes any BOS itself; letting the tokenizer add one too would double it.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(offsets):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[k] = ids[k]

    n_image = ids.count(image_id)
    if n_image != images:
        raise ValueError(f"the rendered chat holds {n_image} image tokens ({image_token!r}, id {image_id}); "
                         f"need {images}")
    if len(ids) > max_length:
        if images and ids.index(image_id) >= max_length:
            raise ValueError(
                f"truncating to max_length={max_length} would cut the image token at position "
                f"{ids.index(image_id)}; raise max_length or shorten the system prompt"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
