"""The demo data as LLaVA-format data (a JSON and its image files, like LLaVA-558K's), and the shards that
`pipeline shards llava` (pipeline/llava_shards.py) makes of it: the path real data takes."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.demo.common import prepare_dir
from pipeline.demo.photos import IMAGE_TOKEN, SOURCES, Sample, make_sample
from pipeline.llava_shards import write_llava_shards

_SHARD_PREFIX = "demo"
# The instruction of the caption records. It is student.conversation.DEFAULT_CAPTION_PROMPT, the one the student
# pairs with a bare caption, so a caption record trains on exactly the tokens its caption alone would.
CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class DemoSource:
    """The demo data as `write_demo_llava` wrote it, and the texts the demo tokenizer learns from."""

    json_path: Path
    images: Path
    texts: list[str]  # per sample: its caption, then its instruction conversation's turns if it has one
    num_conversations: int


def _record(sample_id: str, image: str, sample: Sample) -> dict:
    """The sample's LLaVA record. A caption record is shaped like LLaVA-558K's, whose gpt answer the sharder takes
    as the caption; an instruction record has no such turn, so it names its caption itself."""
    if sample.turns is None:
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                 {"from": "gpt", "value": sample.caption}]
        return {"id": sample_id, "image": image, "conversations": turns}
    return {"id": sample_id, "image": image, "conversations": sample.turns, "caption": sample.caption}


def write_demo_llava(
    out_dir: str | os.PathLike, num_samples: int = 200, seed: int = 0, *, progress: bool = True
) -> DemoSource:
    """Write `num_samples` demo photographs as a LLaVA-format dataset: `out_dir/images/PHOTO/ID.jpg` (RGB or
    greyscale JPEG crops of the bundled photos, shorter side 160-480 px) and `out_dir/demo.json`.

    Record i has id `f"{i:06d}"`. Every third record (i % 3 == 0) is an instruction conversation whose first human
    turn starts with `<image>\\n` (some have a follow-up question), with its caption in a `caption` field; the
    others are LLaVA-558K-style caption records (`<image>\\n` + CAPTION_PROMPT, answered by the caption).
    Same arguments, same bytes.
    """
    from tqdm.auto import tqdm

    out = prepare_dir(out_dir)
    images = out / "images"
    # Cycle through the photographs in a seeded order so that even a handful of samples covers several subjects.
    order = np.random.default_rng(seed).permutation(len(SOURCES))
    cache: dict[str, np.ndarray] = {}
    records, texts = [], []
    for global_index in tqdm(range(num_samples), desc="demo photos", unit="img", disable=not progress):
        source_index = int(order[global_index % len(SOURCES)])
        sample = make_sample(seed, global_index, source_index, cache)
        sample_id = f"{global_index:06d}"
        relative = f"{SOURCES[source_index][0]}/{sample_id}.jpg"
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        (images / relative).write_bytes(sample.jpeg)
        records.append(_record(sample_id, relative, sample))
        texts += [sample.caption, *(turn["value"] for turn in sample.turns or ())]
    json_path = out / "demo.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return DemoSource(json_path=json_path, images=images, texts=texts,
                      num_conversations=sum(1 for r in records if "caption" in r))


def shard_demo_llava(source: DemoSource, out_dir: str | os.PathLike, num_shards: int, *,
                     progress: bool = True) -> list[Path]:
    """`pipeline shards llava` of the demo data: `num_shards` shards `demo-00000.tar`... of near-equal size (earlier
    shards first) under `out_dir`, keys `f"{shard:05d}{i:04d}"`. A rerun of the same build resumes; the shards of
    a different earlier build there are replaced. Returns the shard paths in order."""
    summary = write_llava_shards(source.json_path, source.images, out_dir, prefix=_SHARD_PREFIX,
                                 num_shards=num_shards, workers=1, overwrite=True, progress=progress)
    return list(summary.shards)


def write_demo_shards(
    out_dir: str | os.PathLike, num_samples: int = 200, num_shards: int = 4, seed: int = 0, *, progress: bool = True
) -> list[Path]:
    """Write `num_shards` demo shards holding `num_samples` samples under `out_dir`, through a LLaVA-format copy of
    the data in a temporary directory (`write_demo_llava`, then `shard_demo_llava`: see both for the content).
    Same arguments, same bytes. Returns the shard paths in order."""
    with tempfile.TemporaryDirectory(prefix="demo-llava-") as source_dir:
        source = write_demo_llava(source_dir, num_samples, seed, progress=progress)
        return shard_demo_llava(source, out_dir, num_shards, progress=progress)

