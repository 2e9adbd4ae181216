"""`pipeline preview`: one PNG that shows what a store holds (and what a student predicts) for a few rows.

    pipeline preview runs/demo/store --rows 0,5,9 --shards runs/demo/shards --out preview.png
    pipeline preview --checkpoint runs/demo/checkpoint --store runs/demo/store --rows 0,5,9 --out pred.png

One figure row per sample (`--rows` are rows of the store's index.parquet): the image, then one panel per teacher,
its target read at the sample's target row (samples showing the same image share one). A target with a square
token grid ([g*g, C]) becomes a picture: its tokens projected on their first three principal components (over that
image's tokens), each scaled to 0..255 as R, G, B, and upsampled with nearest so every token is one visible square;
similar colours mean similar features. A single token ([1, C]) is drawn as a bar strip of its channels; other token
counts as a one-row strip of PCA colours. With a checkpoint, each teacher gets the target and the student's
prediction (at the task's last tapped layer) side by side: the prediction is projected on the target's components
and scales, so equal colours mean equal features, and the panel shows their cosine similarity.

Images are read from the shards by the byte offsets in the store's index and checked against its sha1, as
precompute reads them; with a checkpoint, samples come through the training loader, so the student sees exactly
its training input (image and caption).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.errors import UsageError

CELL_INCHES = (2.2, 2.4)  # width, height of one panel
DPI = 100
GRID_PIXELS = 192  # token grids are upsampled to about this many pixels a side


@dataclass
class Panel:
    """One cell of the figure: kind is "image" (PIL image), "grid" ([H, W, 3] uint8), "bars" ([C] float) or
    "empty"; `limits` fixes the bar strip's y range (so a prediction shares its target's)."""

    kind: str
    title: str
    data: object = None
    limits: tuple[float, float] | None = None


def parse_rows(text: str, num_rows: int) -> list[int]:
    """"0,5,9" or "0-3,9" -> [0, 5, 9] / [0, 1, 2, 3, 9]; every row must exist."""
    rows: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                rows.extend(range(int(lo), int(hi) + 1))
            elif part:
                rows.append(int(part))
    except ValueError:
        raise UsageError(f"--rows {text!r}: expected row numbers like 0,5,9 or 0-3") from None
    bad = [r for r in rows if not 0 <= r < num_rows]
    if not rows or bad:
        raise UsageError(f"--rows {text!r}: rows must lie in 0..{num_rows - 1}" + (f" (not {bad})" if bad else ""))
    return list(dict.fromkeys(rows))


def preview_size(num_rows: int, num_cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for `num_rows` samples and `num_cols` panels per sample."""
    return round(num_cols * CELL_INCHES[0] * DPI), round(num_rows * CELL_INCHES[1] * DPI)


# ---- pictures of targets ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PcaBasis:
    """Mean [C], components [3, C] and the per-component range used to map projections to 0..255."""

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray


def fit_pca(tokens: np.ndarray) -> PcaBasis:
    """First three principal components of `tokens` [T, C] (fewer padded with zeros), signs fixed so the largest
    loading of each is positive (the same target always gets the same colours)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    mean = tokens.mean(axis=0)
    centred = tokens - mean
    components = np.zeros((3, tokens.shape[1]))
    if tokens.shape[0] > 1:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(3, vt.shape[0])
        components[:k] = vt[:k]
        signs = np.sign(components[np.arange(3), np.abs(components).argmax(axis=1)])
        components *= np.where(signs == 0, 1.0, signs)[:, None]
    projected = centred @ components.T
    return PcaBasis(mean, components, projected.min(axis=0), projected.max(axis=0))


def pca_colours(tokens: np.ndarray, basis: PcaBasis) -> np.ndarray:
    """[T, C] -> [T, 3] uint8: projections on `basis`, scaled by its range (values outside it are clipped)."""
    projected = (np.asarray(tokens, dtype=np.float64) - basis.mean) @ basis.components.T
    span = np.where(basis.high > basis.low, basis.high - basis.low, 1.0)
    return np.clip((projected - basis.low) / span * 255.0, 0, 255).round().astype(np.uint8)


def target_panel(tokens: np.ndarray, title: str, basis: PcaBasis | None = None,
                 limits: tuple[float, float] | None = None) -> tuple[Panel, PcaBasis | None]:
    """The panel for one target (or prediction) [T, C], and the PCA basis it used (None for a bar strip)."""
    count = tokens.shape[0]
    if count == 1:
        values = np.asarray(tokens[0], dtype=np.float32)
        if limits is None:
            bound = float(np.abs(values).max()) or 1.0
            limits = (-bound * 1.05, bound * 1.05)
        return Panel("bars", title, values, limits), None
    basis = basis or fit_pca(tokens)
    colours = pca_colours(tokens, basis)
    grid = int(round(count ** 0.5))
    picture = colours.reshape(grid, grid, 3) if grid * grid == count else colours.reshape(1, count, 3)
    scale = max(1, GRID_PIXELS // max(picture.shape[:2]))
    picture = np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)
    return Panel("grid", title, picture), basis


# ---- reading --------------------------------------------------------------------------------------------------------

def read_images(index, shards: str, rows: list[int]) -> dict[int, object]:
    """{row: RGB PIL image, or None for a sample without one} for rows of `index` (a store's index.parquet), read
    by its byte offsets, each checked against the indexed sha1."""
    import fsspec

    from pipeline.data.images import ImageDecodeError, decode_rgb
    from pipeline.data.shards import list_shards, read_indexed_image, shard_name

    columns = {c: index.column(c).to_pylist() for c in ("shard", "key", "image_sha1", "image_offset", "image_size")}
    urls = {shard_name(u): u for u in list_shards(shards)}
    images = {}
    for row in rows:
        shard, key = columns["shard"][row], columns["key"][row]
        if shard not in urls:
            raise UsageError(f"row {row} lies in shard {shard}, which is not among --shards {shards}")
        if columns["image_offset"][row] < 0:
            images[row] = None
            continue
        try:
            with fsspec.open(urls[shard], "rb") as f:
                data = read_indexed_image(f, columns["image_offset"][row], columns["image_size"][row],
                                          columns["image_sha1"][row])
            images[row] = decode_rgb(data)
        except (ImageDecodeError, EOFError) as exc:
            raise UsageError(f"row {row} ({shard}/{key}): {exc}; are these the shards the store was built from?") \
                from None
    return images


def _image_title(row: int, key: str, target_row: int) -> str:
    return f"row {row}" + (f", target row {target_row}" if target_row >= 0 else "") + f"\n{key}"


# ---- the two previews -----------------------------------------------------------------------------------------------

def preview_store(store_path: str, rows: str | list[int], out: str, *, shards: str | None = None,
                  teachers: list[str] | None = None) -> tuple[int, int]:
    """PNG of the image and every teacher's target for each sample (`rows`: rows of the store's index.parquet);
    returns its (width, height) in pixels.

    Without `shards` the image column says so and only targets are drawn.
    """
    from pipeline.data.store import TargetStore

    store = TargetStore(store_path)
    rows = parse_rows(rows, store.num_samples) if isinstance(rows, str) else rows
    return render(store_panels(store, rows, shards=shards, teachers=teachers), out)


def store_panels(store, rows: list[int], *, shards: str | None = None,
                 teachers: list[str] | None = None) -> list[list[Panel]]:
    """One line of panels per sample (a row of index.parquet): its image, then each teacher's target, read at the
    sample's target row (samples showing one image share it), all through one reader of the store."""
    names = _teachers(store, teachers)
    index = store.read_index()
    keys = index.column("key").to_pylist()
    target_rows = index.column("target_row").to_pylist()
    images = read_images(index, shards, rows) if shards else {}
    reader = store.reader()
    grid: list[list[Panel]] = []
    for row in rows:
        title = _image_title(row, keys[row], target_rows[row])
        line = [Panel("image", title, images.get(row)) if shards
                else Panel("empty", title + "\n(no --shards: image not shown)")]
        for name in names:
            if target_rows[row] < 0:
                line.append(Panel("empty", f"{name}\n(no target row: no image,\nor a repeated key)"))
                continue
            target, valid, _ = reader.row(name, target_rows[row])
            shape = "x".join(str(x) for x in target.shape)
            if not valid:
                line.append(Panel("empty", f"{name} [{shape}]\n(no target: failed row)"))
                continue
            line.append(target_panel(target, f"{name} [{shape}]")[0])
        grid.append(line)
    return grid


def preview_checkpoint(checkpoint: str, store_path: str, rows: str | list[int], out: str, *,
                       shards: str | None = None) -> tuple[int, int]:
    """PNG of image, then target | prediction for each of the student's tasks; returns (width, height) pixels.

    `shards` defaults to the ones the checkpoint was trained on.
    """
    import torch

    from pipeline.data.loader import Skipped, TrainingSamples
    from pipeline.data.shards import list_shards, shard_name
    from pipeline.data.store import TargetStore
    from student.data import BatchCollator, SampleEncoder
    from student.checkpoint import checkpoint_max_length, load_frozen_student, shards_from_checkpoint

    store = TargetStore(store_path)
    rows = parse_rows(rows, store.num_samples) if isinstance(rows, str) else rows
    shards = shards or shards_from_checkpoint(checkpoint)
    model, tokenizer, image_processor = load_frozen_student(checkpoint)
    tasks = [s for s in model.config.task_specs() if s.name in store.teacher_names()]
    if not tasks:
        raise UsageError(f"the student in {checkpoint} predicts {model.config.task_names()}, none of which is in "
                         f"store {store_path} (it has {store.teacher_names()})")
    names = [s.name for s in tasks]
    index = store.read_index()
    shard_of_row = index.column("shard").to_pylist()
    target_rows = index.column("target_row").to_pylist()
    urls = {shard_name(u): u for u in list_shards(shards)}
    missing = sorted({shard_of_row[r] for r in rows} - set(urls))
    if missing:
        raise UsageError(f"rows {rows} need shard(s) {missing}, which are not among {shards}")
    encoder = SampleEncoder(image_processor, tokenizer, checkpoint_max_length(checkpoint))
    # Each row is read by its byte range: a preview of row 5 does not read a whole dataset.
    samples = TrainingSamples(shards, store_path, names, lambda s: s)
    found = {r: sample for r in rows if not isinstance(sample := samples[r], Skipped) and sample.image is not None}
    lost = [r for r in rows if r not in found]
    if lost:
        raise UsageError(f"rows {lost} could not be read as training samples (no caption, bad image or a changed "
                         "shard; see the warnings above)")
    collate = BatchCollator(tokenizer.pad_token_id, names)
    batch = collate([encoder(found[r]) for r in rows])
    with torch.no_grad():
        output = model(pixel_values=batch.pixel_values, input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask)
    grid = []
    for i, row in enumerate(rows):
        sample = found[row]
        line = [Panel("image", _image_title(row, sample.key, target_rows[row]), sample.image)]
        for spec in tasks:
            layer = spec.layers[-1]
            target = np.asarray(sample.targets[spec.name], dtype=np.float32)
            predicted = output.predictions[spec.name][layer][i].float().numpy()
            if not sample.valid[spec.name]:
                line += [Panel("empty", f"{spec.name} target\n(failed row)"),
                         target_panel(predicted, f"{spec.name} predicted, L{layer}")[0]]
                continue
            cosine = float(torch.nn.functional.cosine_similarity(
                torch.from_numpy(predicted), torch.from_numpy(target), dim=-1).mean())
            panel, basis = target_panel(target, f"{spec.name} target")
            limits = panel.limits
            line += [panel, target_panel(predicted, f"{spec.name} predicted, L{layer}\ncos {cosine:+.2f}", basis,
                                         limits)[0]]
        grid.append(line)
    return render(grid, out)


def _teachers(store, teachers: list[str] | None) -> list[str]:
    names = store.teacher_names()
    if teachers:
        unknown = [t for t in teachers if t not in names]
        if unknown:
            raise UsageError(f"store {store.path} has no teacher(s) {unknown}; it has {names}")
        return list(teachers)
    if not names:
        raise UsageError(f"store {store.path} has no teachers yet; run `pipeline precompute` first")
    return names


# ---- drawing --------------------------------------------------------------------------------------------------------

def render(grid: list[list[Panel]], out: str) -> tuple[int, int]:
    """Draw rows of panels into the PNG `out`; returns its (width, height) in pixels (see `preview_size`)."""
    import os

    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(grid), max(len(line) for line in grid)
    width, height = preview_size(n_rows, n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for r, line in enumerate(grid):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(line):
                ax.axis("off")
                continue
            panel = line[c]
            ax.set_title(panel.title, fontsize=8)
            if panel.kind == "image" and panel.data is not None:
                ax.imshow(np.asarray(panel.data))
            elif panel.kind == "grid":
                ax.imshow(panel.data, interpolation="nearest")
            elif panel.kind == "bars":
                values = panel.data
                colours = np.where(values >= 0, "#c44e52", "#4c72b0")
                ax.bar(np.arange(values.size), values, width=1.0, color=colours, linewidth=0)
                ax.set_xlim(-0.5, values.size - 0.5)
                ax.set_ylim(*panel.limits)
                ax.axhline(0, color="black", linewidth=0.5)
                ax.set_xlabel(f"{values.size} channels", fontsize=7)
            else:
                for side in ax.spines.values():
                    side.set_visible(False)
    fig.tight_layout(pad=0.4)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return width, height


def run_preview(store: str, rows: str, out: str, *, checkpoint: str | None = None,
                shards: str | None = None) -> tuple[int, int]:
    """`pipeline preview`: the store preview, or with `checkpoint` the predicted-vs-target one."""
    if checkpoint:
        return preview_checkpoint(checkpoint, store, rows, out, shards=shards)
    return preview_store(store, rows, out, shards=shards)
