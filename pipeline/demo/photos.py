"""The demo's samples: crops of the photographs that scikit-image ships inside its wheel, each with a caption and,
for every third sample, an instruction conversation in LLaVA's format (`{"from": "human"|"gpt", "value": ...}`).

No network: every photograph is in the wheel. Each sample is seeded by (seed, its global index) alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

# LLaVA's image placeholder, which opens the first human turn; the demo tokenizer makes it one special token.
IMAGE_TOKEN = "<image>"

# (skimage.data loader, what the photograph shows, stored greyscale). lily, kidney and skin are left out on
# purpose: skimage fetches them with pooch, i.e. from the network.
SOURCES: tuple[tuple[str, str, bool], ...] = (
    ("astronaut", "a smiling astronaut posing in front of an American flag", False),
    ("coffee", "a cup of coffee on a saucer", False),
    ("chelsea", "a tabby cat named Chelsea looking at the camera", False),
    ("cat", "a ginger tabby cat sitting by a wall", False),
    ("rocket", "a rocket standing on its launch pad", False),
    ("hubble_deep_field", "a deep field of distant galaxies seen by the Hubble telescope", False),
    ("immunohistochemistry", "a stained tissue sample under a microscope", False),
    ("retina", "a photograph of a human retina with its blood vessels", False),
    ("colorwheel", "a colour wheel showing a rainbow of hues", False),
    ("stereo_motorcycle", "a motorcycle parked in a cluttered workshop", False),
    ("logo", "the scikit-image logo on a white background", False),
    ("camera", "a man standing behind a camera on a tripod", True),
    ("horse", "the black silhouette of a horse", True),
    ("coins", "rows of old coins on a dark background", True),
    ("page", "a scanned page of printed text", True),
    ("text", "a few lines of text in different fonts", True),
    ("moon", "the cratered surface of the moon", True),
    ("brick", "the texture of a brick wall", True),
    ("grass", "a close view of a patch of grass", True),
    ("gravel", "a bed of grey gravel", True),
)

QUESTIONS = (
    "What is shown in this image?",
    "Describe the image in one sentence.",
    "What can you see here?",
    "Give a short caption for this picture.",
    "What is the subject of this photo?",
    "Briefly describe what the picture shows.",
)
ANSWERS = (
    "The image is {caption}.",
    "It is {caption}.",
    "I can see {caption}.",
    "This looks like {caption}.",
)
# Follow-up turns make some conversations multi-turn, which is what the assistant-only label masking must handle.
# (question, answer when the property holds, answer when it does not); the property is decided in `_conversation`.
FOLLOW_UPS = (
    ("Is the image mirrored?", "Yes, it is flipped left to right.", "No, it is not mirrored."),
    ("Is this a colour image?", "Yes, it is in colour.", "No, it is in black and white."),
    ("How large is the image?", "It is {width} by {height} pixels.", "It is {width} by {height} pixels."),
)


@dataclass(frozen=True)
class Sample:
    jpeg: bytes
    caption: str
    turns: list[dict] | None  # an instruction conversation, for every third sample


def load_source(name: str) -> np.ndarray:
    """One skimage sample photograph as uint8 [H, W, 3] (colour) or [H, W] (greyscale)."""
    from skimage import data

    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    if image.dtype == bool:  # horse is a boolean silhouette mask
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[2] == 4:  # logo: flatten RGBA onto white, JPEG has no alpha
        rgb, alpha = image[..., :3].astype(np.float32), image[..., 3:].astype(np.float32) / 255.0
        image = np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: np.random.Generator, subject: str, area: float, mirrored: bool, short_side: int, grey: bool) -> str:
    if area < 0.4:
        view = "close crop"
    elif area < 0.8:
        view = str(rng.choice(["crop", "partial view", "cropped photo"]))
    else:
        view = str(rng.choice(["wide view", "full view", "photo"]))
    size = "small " if short_side < 224 else ("large " if short_side > 400 else "")
    flip = "mirrored " if mirrored else ""
    tone = "greyscale " if grey and rng.random() < 0.5 else ""
    template = int(rng.integers(4))
    if template == 0:
        return f"{_with_article(size + flip + tone + view)} of {subject}"
    if template == 1:
        flipped = ", flipped left to right" if mirrored else ""
        return f"{subject}, seen in {_with_article(size + tone + view)}{flipped}"
    if template == 2:
        return f"{_with_article(tone + flip + view)} showing {subject}"
    return f"{subject} in {_with_article(size + flip + view)}"


def _conversation(
    rng: np.random.Generator, caption: str, mirrored: bool, grey: bool, width: int, height: int
) -> list[dict]:
    question = str(rng.choice(QUESTIONS))
    answer = str(rng.choice(ANSWERS)).format(caption=caption)
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    if rng.random() < 0.4:
        index = int(rng.integers(len(FOLLOW_UPS)))
        follow_up, if_true, if_false = FOLLOW_UPS[index]
        holds = (mirrored, not grey, True)[index]
        reply = (if_true if holds else if_false).format(width=width, height=height)
        turns += [{"from": "human", "value": follow_up}, {"from": "gpt", "value": reply}]
    return turns


def make_sample(seed: int, global_index: int, source_index: int, cache: dict[str, np.ndarray]) -> Sample:
    """Sample `global_index`: a seeded crop of photograph `SOURCES[source_index]` as a JPEG, its caption and, when
    `global_index % 3 == 0`, an instruction conversation. `cache` keeps each decoded photograph for the next crop."""
    from PIL import Image

    # One generator per sample, keyed by (seed, global index): a sample does not depend on how many came before it.
    rng = np.random.default_rng([seed, global_index])
    name, subject, greyscale = SOURCES[source_index]
    if name not in cache:
        cache[name] = load_source(name)
    pixels = cache[name]
    height, width = pixels.shape[:2]

    frac_w = rng.uniform(0.45, 1.0)
    frac_h = float(np.clip(frac_w * rng.uniform(0.75, 1.33), 0.45, 1.0))
    crop_w, crop_h = max(16, round(width * frac_w)), max(16, round(height * frac_h))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = Image.fromarray(pixels[top : top + crop_h, left : left + crop_w])
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short_side = int(rng.integers(160, 481))
    scale = short_side / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    # Half of the greyscale photographs stay single-channel JPEGs: readers must convert them to RGB themselves.
    keep_grey = greyscale and bool(rng.random() < 0.5)
    image = image.convert("L" if keep_grey else "RGB")

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
    caption = _caption(rng, subject, frac_w * frac_h, mirrored, short_side, greyscale)
    turns = None
    if global_index % 3 == 0:
        turns = _conversation(rng, caption, mirrored, greyscale, *image.size)
    return Sample(jpeg=buffer.getvalue(), caption=caption, turns=turns)

