"""Small LLaVA-format datasets on disk, made of the demo photographs, for the tests of `pipeline shards llava`.

`pretrain_558k(root)` is shaped like LLaVA-Pretrain's `blip_laion_cc_sbu_558k.json` + `images/`: single-turn
caption records, images in numbered subfolders. `mix_665k(root)` is shaped like `llava_v1_5_mix665k.json` + its
`coco/`, `gqa/`, `ocr_vqa/`, `textvqa/`, `vg/` folders, with the awkward cases of the real mix: multi-turn
conversations, text-only records, a duplicate id, an OCR-VQA `.jpg` that is a PNG, and images that are missing,
empty or not images at all. `hostile_images(root)` is an images folder beside files its records must never reach
(a photo outside it, /etc/passwd, /dev/zero), with symlinks out, a FIFO, a folder and an oversized file in it.
Photos are shrunk to at most 160 px so that the tests stay fast.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.demo.photos import SOURCES, load_source

MAX_SIDE = 160
PRETRAIN_RECORDS = 24
MIX_RECORDS = 30

# Instructions of the kind LLaVA-558K pairs with its BLIP captions, placed before or after the image.
_CAPTION_INSTRUCTIONS = (
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
)


@dataclass(frozen=True)
class LlavaSet:
    """A LLaVA JSON and its images folder, with what the sharder must make of them."""

    json_path: Path
    images: Path
    records: list[dict]
    left_out: dict[str, str]  # id -> the reason the record must be left out
    lying: frozenset[str]  # ids whose image file's extension names another format
    text_only: frozenset[str]
    duplicate_ids: int


@functools.lru_cache(maxsize=None)
def _photo(index: int) -> Image.Image:
    image = Image.fromarray(load_source(SOURCES[index % len(SOURCES)][0]))
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _encoded(index: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    _photo(index).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(images: Path, relative: str, payload: bytes) -> None:
    path = images / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _subject(index: int) -> str:
    return SOURCES[index % len(SOURCES)][1]


def _save_json(root: Path, name: str, records: list[dict]) -> Path:
    path = root / name
    path.write_text(json.dumps(records, indent=1))
    return path


def pretrain_558k(root: Path) -> LlavaSet:
    """`root/blip_laion_cc_sbu_558k.json` + `root/images/NNNNN/ID.jpg`: one caption record per photo."""
    images = root / "images"
    records = []
    for i in range(PRETRAIN_RECORDS):
        record_id = f"{4_539_375 + 7_919 * i:09d}"
        relative = f"{record_id[:5]}/{record_id}.jpg"
        _write(images, relative, _encoded(i, "JPEG"))
        instruction = _CAPTION_INSTRUCTIONS[i % len(_CAPTION_INSTRUCTIONS)]
        human = f"{instruction}\n<image>" if i % 2 else f"<image>\n{instruction}"
        records.append({"id": record_id, "image": relative, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": _subject(i)}]})
    return LlavaSet(json_path=_save_json(root, "blip_laion_cc_sbu_558k.json", records), images=images,
                    records=records, left_out={}, lying=frozenset(), text_only=frozenset(), duplicate_ids=0)


def _qa(*pairs: tuple[str, str], image: bool = True) -> list[dict]:
    """LLaVA turns for (question, answer) pairs; with an image, the first question starts with `<image>\\n`."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        text = f"<image>\n{question}" if i == 0 and image else question
        turns += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    return turns


def mix_665k(root: Path) -> LlavaSet:
    """`root/llava_v1_5_mix665k.json` + the mix's image folders under `root/data` (see the module docstring)."""
    images = root / "data"
    records: list[dict] = []
    left_out: dict[str, str] = {}
    lying, text_only = set(), set()

    def add(record_id: str, relative: str | None, turns: list[dict], payload: bytes | None = None) -> None:
        """One record; its image file holds `payload`, or is not written at all when that is None."""
        records.append({"id": record_id, **({"image": relative} if relative else {}), "conversations": turns})
        if relative is not None and payload is not None:
            _write(images, relative, payload)

    for i in range(8):  # LLaVA-Instruct on COCO: multi-turn; the sixth image was never downloaded
        record_id = f"{33_471 + 1_000 * i:012d}"
        turns = _qa(("What is shown in this image?", f"The image shows {_subject(i)}."),
                    ("Is it a photograph?", "Yes, it is a photograph."))
        add(record_id, f"coco/train2017/{record_id}.jpg", turns, None if i == 5 else _encoded(i, "JPEG"))
    left_out[records[5]["id"]] = "missing"
    for i in range(5):  # GQA: short answers; the last record repeats the first one's id
        record_id = str(2_354_786 + i) if i < 4 else "2354786"
        turns = _qa(("Is the picture in colour?\nAnswer the question using a single word or phrase.",
                              "Yes"), ("What is in the picture?", _subject(8 + i)))
        add(record_id, f"gqa/images/{2_354_786 + i}.jpg", turns, _encoded(8 + i, "JPEG"))
    for i in range(5):  # OCR-VQA: the third file is a PNG under a .jpg name, as some real ones are
        record_id = f"{1_400_000 + i}"
        turns = _qa(("Who wrote this book?", "Unknown"), ("What is the title of this book?", "A page"))
        add(record_id, f"ocr_vqa/images/{record_id}.jpg", turns, _encoded(13 + i, "PNG" if i == 2 else "JPEG"))
    lying.add(records[-3]["id"])
    for i in range(4):  # TextVQA: single turn, but a question; the second file is an HTML error page
        record_id = f"{0x0054a8ba + i:016x}"
        payload = b"<html><body>404 Not Found</body></html>" if i == 1 else _encoded(18 + i, "JPEG")
        turns = _qa(("what is written here?\nAnswer the question using a single word or phrase.", "text"))
        add(record_id, f"textvqa/train_images/{record_id}.jpg", turns, payload)
    left_out[records[-3]["id"]] = "not an image"
    for i in range(4):  # Visual Genome: region questions; the third file is empty
        record_id = f"{2_360_000 + i}"
        turns = _qa(("Describe the region near the centre.", f"It shows part of {_subject(2 + i)}."))
        add(record_id, f"vg/VG_100K/{record_id}.jpg", turns, b"" if i == 2 else _encoded(2 + i, "JPEG"))
    left_out[records[-2]["id"]] = "empty"
    for i in range(4):  # ShareGPT: text only
        record_id = f"i6IyJda_{i}"
        turns = _qa(("Write a haiku about shards.", "Tar files in a row / keys that never collide / the index "
                                                     "reads them"), ("Thanks!", "You are welcome."), image=False)
        add(record_id, None, turns)
        text_only.add(record_id)
    assert len(records) == MIX_RECORDS
    return LlavaSet(json_path=_save_json(root, "llava_v1_5_mix665k.json", records), images=images, records=records,
                    left_out=left_out, lying=frozenset(lying), text_only=frozenset(text_only), duplicate_ids=1)


# max_image_bytes for the hostile set: its photos are smaller (at most about 9 KB), big.jpg is larger.
HOSTILE_LIMIT = 20_000


@dataclass(frozen=True)
class HostileSet:
    """An images folder and records whose `image` names what the sharder must refuse to read."""

    images: Path
    outside: Path  # a real photo beside the images folder, not in it
    good: list[dict]  # records that must become samples: two photos, a symlink to one of them, a text-only record
    hostile: dict[str, tuple[str, str]]  # case -> (the record's `image`, the reason it must be left out)


def _record(record_id: str, image: str | None) -> dict:
    turns = _qa(("What is shown in this image?", "A photograph."), image=image is not None)
    return {"id": record_id, **({"image": image} if image is not None else {}), "conversations": turns}


def hostile_record(case: str, hostile: HostileSet) -> dict:
    """The record of one of `hostile.hostile`'s cases."""
    return _record(f"hostile {case}", hostile.hostile[case][0])


def hostile_images(root: Path) -> HostileSet:
    """`root/outside.jpg` and `root/images/`: good/0.jpg, good/1.jpg, inside.jpg -> good/1.jpg; escape.jpg ->
    ../outside.jpg, elsewhere/ -> root, zero.jpg -> /dev/zero; the FIFO pipe.jpg, the folder folder.jpg/ and
    big.jpg, a photo padded past HOSTILE_LIMIT."""
    images = root / "images"
    for i in range(2):
        _write(images, f"good/{i}.jpg", _encoded(i, "JPEG"))
    outside = root / "outside.jpg"
    outside.write_bytes(_encoded(2, "JPEG"))
    (images / "inside.jpg").symlink_to("good/1.jpg")
    (images / "escape.jpg").symlink_to("../outside.jpg")
    (images / "elsewhere").symlink_to(root, target_is_directory=True)
    (images / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(images / "pipe.jpg")
    (images / "folder.jpg").mkdir()
    _write(images, "big.jpg", _encoded(3, "JPEG") + bytes(HOSTILE_LIMIT))  # decoders ignore bytes after the image
    good = [_record("good 0", "good/0.jpg"), _record("good 1 by symlink", "inside.jpg"),
            _record("good 1", "good/1.jpg"), _record("text only", None)]
    hostile = {
        "parent folder": ("../outside.jpg", "outside images"),
        "absolute path": (str(outside), "bad path"),
        "symlink out": ("escape.jpg", "outside images"),
        "symlinked folder out": ("elsewhere/outside.jpg", "outside images"),
        "/etc/passwd": ("/etc/passwd", "bad path"),
        "/etc/passwd by ..": ("../" * 32 + "etc/passwd", "outside images"),
        "/dev/zero": ("/dev/zero", "bad path"),
        "/dev/zero by symlink": ("zero.jpg", "outside images"),
        "fifo": ("pipe.jpg", "not a file"),
        "folder": ("folder.jpg", "not a file"),
        "too large": ("big.jpg", "too large"),
        "nul byte": ("good/0.jpg\0.png", "bad path"),
        "lone surrogate": ("good/\ud800.jpg", "bad path"),
    }
    return HostileSet(images=images, outside=outside, good=good, hostile=hostile)


# skimage's `cat` is `chelsea` under another name: the same pixels.
_DISTINCT_SOURCES = [i for i, (name, _, _) in enumerate(SOURCES) if name != "cat"]


def distinct_photo(index: int) -> bytes:
    """JPEG bytes of the index-th distinct photo: the demo photographs, then their mirror images, then crops."""
    image = _photo(_DISTINCT_SOURCES[index % len(_DISTINCT_SOURCES)])
    variant = index // len(_DISTINCT_SOURCES)
    if variant % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if variant >= 2:
        image = image.crop((variant, variant, image.width - variant, image.height - variant))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def photo_path(images: Path, index: int) -> str:
    """The path, relative to `images`, of the index-th distinct photo (written there)."""
    relative = f"photos/{index:04d}.jpg"
    _write(images, relative, distinct_photo(index))
    return relative


def copy_path(images: Path, index: int, copy: int) -> str:
    """The path of a byte-identical copy of the index-th distinct photo under another name (written there)."""
    relative = f"copies/{copy}/{index:04d}-copy.jpg"
    _write(images, relative, distinct_photo(index))
    return relative


def caption_records(root: Path, name: str, images: list[str | None]) -> LlavaSet:
    """`root/NAME.json`, a LLaVA-558K-style caption record per entry of `images` (a path under `root/images`, as
    `photo_path` and `copy_path` give; None for a text-only record), record ids from NAME."""
    records = []
    for i, relative in enumerate(images):
        turns = _qa(("Describe the image briefly.", f"Picture {relative}."), image=relative is not None)
        records.append({"id": f"{name}-{i}", **({"image": relative} if relative else {}), "conversations": turns})
    text_only = frozenset(r["id"] for r in records if "image" not in r)
    return LlavaSet(json_path=_save_json(root, f"{name}.json", records), images=root / "images", records=records,
                    left_out={}, lying=frozenset(), text_only=text_only, duplicate_ids=0)
