"""`pipeline visualize`: what a student's predicted embeddings mean, decoded by the teachers' own heads.

    pipeline visualize --checkpoint runs/demo/checkpoint --teachers manifests/teachers/demo.yaml \
        --image photo.jpg --out runs/demo/visualize.png

The student runs once on the image and the prompt, as `pipeline generate` feeds it, and predicts each task's
embedding from each tapped LLM layer. Every prediction goes through its teacher's decoder (teachers/decoding.py):
the depth prediction through Depth-Anything-V2's DPT neck and head, the segmentation prediction through OneFormer's
pixel and transformer decoders, the generation prediction through the unCLIP pipeline. The picture has one row per
task: the image, the teacher's own target decoded the same way (what a perfect prediction would show), then one
column per tapped layer. A kind without a decoder, or a teacher missing from the manifest, gets a row that says so.

Visualising loads teachers, one at a time (training never does). The record of what made the picture (checkpoint,
image hash, prompt, seed, fingerprints, decoder settings) is written into the PNG's text chunk and into a JSON file
beside it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import teachers
from pipeline.data.errors import UsageError
from pipeline.data.fingerprints import fingerprint_mismatch
from student.checkpoint import load_frozen_student, training_provenance
from student.generate import prompt_inputs, read_image
from teachers.decoding import Decoded, DepthMap, GeneratedImage, PanopticMasks

DEFAULT_PROMPT = "Describe the image."
METADATA_KEY = "pipeline.visualize"  # the PNG text chunk holding the record


@dataclass
class Cell:
    title: str
    decoded: Decoded | None = None
    note: str = ""  # why there is no picture


@dataclass
class TaskRow:
    task: str
    kind: str
    cells: list[Cell]


def student_predictions(checkpoint: str, image: Image.Image, prompt: str,
                        device: torch.device) -> dict[str, dict[int, torch.Tensor]]:
    """{task: {layer: [T, C] float32 on the CPU}}: what the student predicts from each tapped layer."""
    model, tokenizer, image_processor = load_frozen_student(checkpoint)
    if not model.config.task_specs():
        raise UsageError(f"the student in {checkpoint} has no distillation tasks (a next-token-only stage): "
                         "there are no predicted embeddings to decode")
    model.to(device)
    inputs = {k: v.to(device) for k, v in prompt_inputs(checkpoint, tokenizer, image_processor, image, prompt).items()}
    with torch.no_grad():
        out = model(**inputs)
    predictions = {task: {layer: p[0].float().cpu() for layer, p in layers.items()}
                   for task, layers in out.predictions.items()}
    del model
    return predictions


def _decode_task(spec, predictions: dict[int, torch.Tensor], image: Image.Image, seed: int,
                 device: torch.device) -> tuple[list[Cell], dict[str, Any]]:
    """The cells of one task's row (teacher target, then each layer) and its record."""
    teacher = teachers.create(spec, device=device)
    record: dict[str, Any] = {"kind": spec.kind, "teacher_fingerprint": teacher.fingerprint,
                              "target_shape": list(teacher.target_shape)}
    layer_titles = [f"layer {layer}" for layer in predictions]
    try:
        decoder = teacher.decoder()
        note = f"kind {spec.kind} has no decoder" if decoder is None else ""
    except (OSError, ValueError) as exc:  # e.g. a gen teacher folder with the image encoder only
        note = f"no decoder: {' '.join(str(exc).split())}"
    if note:
        return [Cell(title, note=note) for title in ["teacher target", *layer_titles]], {**record, "note": note}
    record["decoder"] = {"what": decoder.what, **decoder.settings()}
    with torch.no_grad():
        target = teacher(teacher.preprocess([image]))[0].float().cpu()
    cells = [Cell("teacher target", decoder.decode(image, target, seed=seed))]
    for (layer, prediction), title in zip(predictions.items(), layer_titles):
        if tuple(prediction.shape) != tuple(teacher.target_shape):
            cells.append(Cell(title, note=f"the student predicts {list(prediction.shape)}, the teacher's targets "
                                          f"are {list(teacher.target_shape)}"))
            continue
        cells.append(Cell(title, decoder.decode(image, prediction, seed=seed)))
    return cells, record


def visualize(checkpoint: str, teachers_manifest: str, image_path: str, out: str, *, prompt: str = DEFAULT_PROMPT,
              seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Draw the picture to `out` (PNG) and its record to `out` with `.json`; returns the record."""
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    manifest = teachers.load_manifest(teachers_manifest)
    image = read_image(image_path)
    predictions = student_predictions(checkpoint, image, prompt, torch_device)
    trained_on = training_provenance(checkpoint).get("store") or {}
    rows, records = [], {}
    for task, layers in predictions.items():
        spec = manifest.teachers.get(task)
        if spec is None:
            note = f"no teacher {task!r} in {teachers_manifest}"
            rows.append(TaskRow(task, "?", [Cell("teacher target", note=note)]))
            records[task] = {"note": note, "layers": list(layers)}
            continue
        cells, record = _decode_task(spec, layers, image, seed, torch_device)
        stored = (trained_on.get("teachers") or {}).get(task, {}).get("teacher_fingerprint")
        record.update(layers=list(layers), trained_on_fingerprint=stored)
        if stored and stored != record["teacher_fingerprint"]:
            record["warning"] = fingerprint_mismatch(
                task, record["teacher_fingerprint"], stored, where=f"in {teachers_manifest}",
                expected_by=f"checkpoint {checkpoint}",
                remedy="the student was trained on targets of another teacher; pass the teachers manifest it was "
                "trained with to compare its predictions with that teacher's targets")
            print(f"warning: {record['warning']}")
        rows.append(TaskRow(task, spec.kind, cells))
        records[task] = record
        gc.collect()  # one teacher and its decoder in memory at a time
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "teachers_manifest": str(Path(teachers_manifest).resolve()),
        "image": str(Path(image_path).resolve()),
        "image_sha1": hashlib.sha1(Path(image_path).read_bytes()).hexdigest(),
        "prompt": prompt,
        "seed": seed,
        "device": str(torch_device),
        "store": trained_on.get("store"),
        "dataset_fingerprint": trained_on.get("dataset_fingerprint"),
        "tasks": records,
    }
    draw(image, rows, out, record)
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---- drawing ---------------------------------------------------------------------------------------------------

def depth_colours(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A depth map normalised per image to [0, 1] and coloured with a perceptually uniform map (inferno), resized to
    `size` (W, H): uint8 [H, W, 3]."""
    from matplotlib import colormaps

    span = float(depth.max() - depth.min())
    unit = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    resized = Image.fromarray(unit.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return (colormaps["inferno"](np.clip(np.asarray(resized), 0, 1))[..., :3] * 255).astype(np.uint8)


def panoptic_overlay(image: Image.Image, masks: PanopticMasks) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The image with each segment tinted in its own colour, and (x, y, class name) at each large segment's centre."""
    from matplotlib import colormaps

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    segmentation = masks.segmentation
    if segmentation.shape != base.shape[:2]:
        segmentation = np.asarray(Image.fromarray(segmentation.astype(np.int32)).resize(
            image.size, Image.Resampling.NEAREST))
    palette = colormaps["tab20"].colors
    labels = []
    for i, segment in enumerate(masks.segments):
        where = segmentation == segment.id
        if not where.any():
            continue
        colour = np.array(palette[i % len(palette)]) * 255
        base[where] = 0.45 * base[where] + 0.55 * colour
        if where.mean() > 0.01:
            ys, xs = np.nonzero(where)
            labels.append((float(np.median(xs)), float(np.median(ys)), segment.label))
    return base.astype(np.uint8), labels


def draw(image: Image.Image, rows: list[TaskRow], out: str, record: dict[str, Any]) -> None:
    """One row per task: the image, then its cells; the record goes into the PNG's text chunk."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from PIL.PngImagePlugin import PngInfo

    columns = 1 + max(len(row.cells) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.3 * columns, 2.4 * len(rows)), squeeze=False)
    size = image.size
    for r, row in enumerate(rows):
        axes[r][0].imshow(image)
        axes[r][0].set_title("image" if r == 0 else "", fontsize=9)
        axes[r][0].set_ylabel(f"{row.task}\n({row.kind})", fontsize=9)
        for c in range(1, columns):
            ax = axes[r][c]
            if c - 1 >= len(row.cells):
                ax.axis("off")
                continue
            cell = row.cells[c - 1]
            ax.set_title(cell.title, fontsize=9)
            if isinstance(cell.decoded, DepthMap):
                ax.imshow(depth_colours(cell.decoded.depth, size))
            elif isinstance(cell.decoded, PanopticMasks):
                overlay, labels = panoptic_overlay(image, cell.decoded)
                ax.imshow(overlay)
                if not cell.decoded.segments:
                    ax.set_xlabel("no segment passes\nthe teacher's thresholds", fontsize=7)
                for x, y, label in labels:
                    ax.text(x, y, label, fontsize=6, ha="center", va="center",
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
            elif isinstance(cell.decoded, GeneratedImage):
                # Nearest: a small generated image (the demo's is 64 px) shows its own pixels, not a blur of them.
                ax.imshow(cell.decoded.image, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, textwrap.fill(cell.note, 28), ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{Path(record['checkpoint']).name}: \"{record['prompt']}\" (seed {record['seed']})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(record, sort_keys=True))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").save(out, pnginfo=info, optimize=True)
